"""KDiffusion (Yao et al., AAAI 2024): schedule, reverse chain, per-layer losses and the distiller.

Importing this package registers the methods ``kdiffusion`` (Multiple Layer + Target Guide),
``kdiffusion_multi``, ``kdiffusion_single`` and ``kdiffusion_single_avg``.
"""

from pipeline.distill.kdiffusion.distiller import KDiffusion, KDiffusionMulti, KDiffusionSingle, KDiffusionSingleAverage

__all__ = ["KDiffusion", "KDiffusionMulti", "KDiffusionSingle", "KDiffusionSingleAverage"]
