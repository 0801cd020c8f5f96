"""TaDA and exact LoRA-space merge methods for mergekit.

This module stays import-light on purpose: the ``.pth`` start-up hook imports
``mergekit_tada._hook`` (and therefore this file) in every Python process, so
nothing here may import torch or mergekit. The public API is loaded lazily.
"""

from mergekit_tada.version import __version__

__all__ = ["merge", "__version__"]


def __getattr__(name: str):  # noqa: ANN202 - no typing import at start-up
    if name == "merge":
        from mergekit_tada.api import merge

        return merge
    raise AttributeError(f"module 'mergekit_tada' has no attribute {name!r}")
