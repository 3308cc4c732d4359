"""aff_lightning: the Gaussian-affinity max-margin loss for class-imbalanced classification.

``AffinityHead`` and ``functional`` import with PyTorch alone; ``AffinityClassifier`` and
``ImbalancedDataModule`` need Lightning and are imported on first use, so
``from aff_lightning import AffinityHead`` works in any PyTorch codebase.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from aff_lightning import functional
from aff_lightning.heads import AffinityHead

if TYPE_CHECKING:
    from aff_lightning.data import ImbalancedDataModule
    from aff_lightning.model import AffinityClassifier

__all__ = ["AffinityClassifier", "AffinityHead", "ImbalancedDataModule", "functional"]
__version__ = "0.1.0"

_LAZY = {"AffinityClassifier": "aff_lightning.model", "ImbalancedDataModule": "aff_lightning.data"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aff_lightning' has no attribute {name!r}")
