"""Images: a store of cached build artefacts (:mod:`.store`) and the recipes that fill it.

- :mod:`.debootstrap`: the Debian root every direct-mode workspace boots, and its package variants.
"""

from .debootstrap import DebianRoot
from .store import ImageStore

__all__ = ["DebianRoot", "ImageStore"]
