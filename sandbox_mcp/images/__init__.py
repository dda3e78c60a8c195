"""Root images for direct-mode workspaces."""

from .debootstrap import ImageStore

__all__ = ["ImageStore"]
