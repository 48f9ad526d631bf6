"""Placeholder so that ``pipeline.models._load_zoo`` imports on this branch.

The ImageNet zoo is written on another branch; on merge, take that branch's version of this file.
"""
