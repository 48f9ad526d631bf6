"""KDiffusion's m-branch blocks (filled in by the KDiffusion work)."""
