"""Placeholder so the zoo imports on this branch; the ImageNet students come with the data/models issue.

Merge note: take the other branch's version of this file.
"""
