"""Segmentation networks (U-Net, residual U-Net, MONAI nets) behind one registry.

MONAI is imported only when a MONAI-backed model is created.
"""

from __future__ import annotations

from brainseg.models.registry import ModelConfigError, available_models, create_model

__all__ = ["ModelConfigError", "available_models", "create_model"]
