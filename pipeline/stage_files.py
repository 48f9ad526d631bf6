"""The names of the files a stage hands on, to a later stage or to the readers of a run (report, compare).

One definition each: the producing stage declares it on ``Stage.outputs`` and every consumer names it from
here, so no stage imports another and the report reads a run folder without loading torch. Standard
library only, so ``exports/`` may use it too. Names that belong to one format stay with it (the ONNX files
in ``exports/precisions.py``, the golden I/O in ``exports/``, ``manifest.json`` in ``pipeline/artifacts/manifest.py``).
"""

from __future__ import annotations

TEACHER_CHECKPOINT = "teacher.safetensors"  # teacher -> train
STUDENT_CHECKPOINT = "student.safetensors"  # train -> fuse, verify
FUSED_CHECKPOINT = "student_fused.safetensors"  # fuse -> verify, export
HISTORY = "history.json"  # teacher, train -> report, compare: one record per epoch
REPORT = "report.json"  # verify, export, engine -> report, compare; export -> engine
CALIBRATION_RANGES = "int8_calibration.json"  # export -> report: the INT8 calibration ranges and their key
