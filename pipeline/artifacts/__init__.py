"""What makes an artifact checked: atomic writes, hashes, manifests, the run store, checkpoints, code fingerprints.

The layer every stage and the runner build on; it imports nothing above the foundation modules
(``pipeline.errors`` and the like), so an exporter may use it without pulling in models or training.
"""
