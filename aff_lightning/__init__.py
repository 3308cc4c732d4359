"""aff_lightning: the Gaussian-affinity max-margin loss for class-imbalanced classification.

Exports load on first use: ``AffinityHead`` and ``functional`` need PyTorch alone, so
``from aff_lightning import AffinityHead`` works in any PyTorch codebase without Lightning;
``AffinityClassifier`` and ``ImbalancedDataModule`` bring Lightning in when asked for, and the
torch-free report tools (``aff_lightning.experiments.report``) stay quick to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aff_lightning import functional
    from aff_lightning.data import ImbalancedDataModule
    from aff_lightning.heads import AffinityHead
    from aff_lightning.model import AffinityClassifier

__all__ = ["AffinityClassifier", "AffinityHead", "ImbalancedDataModule", "functional"]
__version__ = "0.1.0"

_LAZY = {
    "AffinityClassifier": "aff_lightning.model",
    "AffinityHead": "aff_lightning.heads",
    "ImbalancedDataModule": "aff_lightning.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "functional":
        return importlib.import_module("aff_lightning.functional")
    raise AttributeError(f"module 'aff_lightning' has no attribute {name!r}")
