"""soundpatch: batch audio inpainting. This package is the core; it never imports Prefect."""

__version__ = "0.1.0"
