"""medmtl.inference: sliding-window prediction, the batch runner behind `medmtl infer`, output writers.

`Predictor`, `Prediction` and `run_batch` are loaded on first use, so that importing
`medmtl.inference.sliding` (as training configs do) does not import the DICOM SEG writer.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Prediction", "Predictor", "run_batch"]

_LAZY = {"Prediction": "predictor", "Predictor": "predictor", "run_batch": "batch"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
