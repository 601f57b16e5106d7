"""Patient identifiers kept out of MLflow, and values made valid MLflow keys, params and metric values."""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

# DICOM keywords and tag numbers of patient identifiers, lower case without separators.
_PHI_KEYS = frozenset(
    {
        "patientname",
        "patientid",
        "patientbirthdate",
        "accessionnumber",
        "00100010",
        "00100020",
        "00100030",
        "00080050",
    }
)


def _is_phi_key(key: Any) -> bool:
    """Whether any dotted/slashed part of `key` names a patient identifier, in any spelling or case."""
    parts = re.split(r"[./#]", str(key))
    return any(re.sub(r"[^a-z0-9]", "", part.lower()) in _PHI_KEYS for part in parts)


def scrub_identifiers(data: Any) -> Any:
    """Drop every mapping key named like a patient identifier, recursively.

    Args:
        data: a mapping, list or scalar (params, tags, config, case rows).

    Returns:
        A copy without keys such as PatientName, patient_id, PATIENTBIRTHDATE, AccessionNumber, (0010,0020),
        at any depth (dicts inside lists included); other values unchanged.
    """
    if isinstance(data, Mapping):
        return {k: scrub_identifiers(v) for k, v in data.items() if not _is_phi_key(k)}
    if isinstance(data, (list, tuple)):
        return [scrub_identifiers(v) for v in data]
    return data


def _mlflow_key(name: Any) -> str:
    """`name` made a valid MLflow metric/param/tag key (bundle ids like `train#trainer` are not)."""
    key = re.sub(r"[^\w.\- /]", "_", str(name))
    key = "/".join(part for part in key.split("/") if part not in ("", ".", ".."))  # must not look like a path
    return key[:MAX_ENTITY_KEY_LENGTH] or "_"


def flatten_params(params: Mapping[str, Any] | None, prefix: str = "") -> dict[str, str]:
    """Nested hyperparameters as MLflow params.

    Args:
        params: nested mapping; lists and other values become their string form.
        prefix: key prefix (used by the recursion).

    Returns:
        `{"a.b.c": "value"}` with keys made valid for MLflow, values truncated to MLflow's limit and keys
        named like patient identifiers dropped.
    """
    flat: dict[str, str] = {}
    for key, value in (params or {}).items():
        name = f"{prefix}{key}"
        if _is_phi_key(key):
            continue
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = json.dumps(scrub_identifiers(value), default=str) if isinstance(value, (list, tuple)) else str(value)
        flat[_mlflow_key(name)] = text[:MAX_PARAM_VAL_LENGTH]
    return flat


def _as_scalar(value: Any) -> float | None:
    """`value` as a float if it is one number (Python, NumPy or a one-element tensor), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)) and int(np.prod(value.shape)) == 1:
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) and not isinstance(item, bool) else None
    return None
