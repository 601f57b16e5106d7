"""How medmtl's tracker sits in a MONAI bundle: MONAI's own MLflow handler dropped, params from the config."""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Sequence
from typing import Any

from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import EXPR_KEY, ID_SEP_KEY, MACRO_KEY

from medmtl.errors import MedmtlError

logger = logging.getLogger(__name__)


def drop_duplicate_mlflow_handlers(handlers: Sequence[Any] | None) -> list[Any]:
    """Remove the `monai.handlers.MLFlowHandler` that `monai.bundle run ... --tracking mlflow` appends.

    medmtl bundles record runs with `MLflowTracker`; MONAI's handler would open a second run with other
    metric names. Bundle configs pass `train#handlers` and `validate#handlers` through this function.

    Args:
        handlers: a handler list (None is an empty list).

    Returns:
        The list without MLFlowHandler instances, order kept.
    """
    from monai.handlers import MLFlowHandler

    handlers = list(handlers or [])
    kept = [h for h in handlers if not isinstance(h, MLFlowHandler)]
    if len(kept) != len(handlers):
        logger.info(
            "dropped %d MONAI MLFlowHandler (from --tracking mlflow): medmtl's MLflowTracker already records this run",
            len(handlers) - len(kept),
        )
    return kept


# ----------------------------------------------------------------------------------------------------------
# The resolved bundle config

_SCALARS = (str, int, float, bool, type(None))


class BundleConfig:
    """The config of the MONAI bundle being run, read from MONAI's reference resolver when the run starts.

    "Resolved" means: the config files merged with the command-line overrides (`--optimizer#_target_ ...`
    is what is logged), and each `$expression` that MONAI has evaluated by then replaced by its value when
    that is a number, text or list of them. Expressions not yet evaluated, or evaluated to objects (networks,
    datasets, the datalist), keep their text: evaluating them here could have side effects, and a datalist
    may hold patient folder names.
    """

    def __init__(self, resolver: Any) -> None:
        """
        Args:
            resolver: the `monai.bundle.ReferenceResolver` of the bundle's `ConfigParser`.
        """
        self._resolver = resolver

    def _top(self, skip: Sequence[str] = (), skip_values: Sequence[Any] = ()) -> dict[str, Any]:
        """{top-level id: raw config}, without `skip` ids and items resolved to one of `skip_values`."""
        resolved = self._resolver.resolved_content
        return {
            i: item.get_config()
            for i, item in self._resolver.items.items()
            if i and ID_SEP_KEY not in i and not i.startswith("_meta_") and i not in skip
            if not any(resolved.get(i, _DROP) is v for v in skip_values)
        }

    def _walk(self, id: str, raw: Any, expand: bool, seen: frozenset[str] = frozenset()) -> Any:
        """`raw` (the config of item `id`) as data; `_DROP` for what is not data (its text when `expand`).

        `expand`: references to data are replaced by it, anything else that is not data is kept as its text
        (the config artifact); otherwise references and what is not data are left out (params: what a
        reference points at is logged under its own name).
        """
        if isinstance(raw, str) and ReferenceResolver.id_matcher.fullmatch(raw):  # a plain `@id`
            ref = ReferenceResolver.normalize_id(raw[1:])
            item = self._resolver.items.get(ref)
            if not expand or item is None or ref in seen:
                return raw if expand else _DROP
            target = item.get_config()
            if isinstance(target, dict) and "_target_" in target:  # a component: its own item says what it is
                return raw
            return self._walk(ref, target, expand, seen | {ref})
        if isinstance(raw, str) and raw.startswith((EXPR_KEY, MACRO_KEY)):
            value = self._resolver.resolved_content.get(id, _DROP)
            if isinstance(value, _SCALARS) or (
                isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value)
            ):
                return list(value) if isinstance(value, tuple) else value
            return raw if expand else _DROP
        if isinstance(raw, dict):
            out = {k: self._walk(f"{id}{ID_SEP_KEY}{k}", v, expand, seen) for k, v in raw.items()}
            return {k: v for k, v in out.items() if v is not _DROP and v not in ({}, [])}
        if isinstance(raw, list):
            out = [self._walk(f"{id}{ID_SEP_KEY}{n}", v, expand, seen) for n, v in enumerate(raw)]
            return [v for v in out if v is not _DROP and v not in ({}, [])]
        return raw if isinstance(raw, _SCALARS) else (str(raw) if expand else _DROP)

    def resolved(self, skip_values: Sequence[Any] = ()) -> dict[str, Any]:
        """The whole config, resolved as far as it is data (other values as their config text).

        Args:
            skip_values: leave out the top-level items resolved to one of these objects (the tracker itself).
        """
        return {i: self._walk(i, raw, expand=True) for i, raw in self._top(skip_values=skip_values).items()}

    def params(self, skip: Sequence[str] = ("params", "imports"), skip_values: Sequence[Any] = ()) -> dict[str, Any]:
        """The config's data only (literals and evaluated scalar expressions, at their own id), nested.

        Args:
            skip: top-level items left out (`params` is logged by the tracker as given, `imports` is code).
            skip_values: leave out the top-level items resolved to one of these objects (the tracker itself).
        """
        out = {i: self._walk(i, raw, expand=False) for i, raw in self._top(skip, skip_values).items()}
        return {k: v for k, v in out.items() if v is not _DROP and v not in ({}, [])}


class _Drop:
    """Marks a config value that is not data."""


_DROP = _Drop()


def bundle_config() -> BundleConfig:
    """The config of the MONAI bundle whose items are being resolved, for `MLflowTracker(config=...)`.

    Call it from a bundle config (`config: "$medmtl.tracking.bundle_config()"`): MONAI has no public way for
    a config item to reach its parser, so this finds the `ReferenceResolver` resolving the current item on the
    call stack. The values are read when the run starts, after MONAI has built the trainer.

    Raises:
        MedmtlError: not called while a MONAI bundle config is being resolved.
    """
    config = _resolving_bundle()
    if config is None:
        raise MedmtlError("bundle_config(): call it from a MONAI bundle config item (no bundle is being resolved)")
    return config


def _resolving_bundle() -> BundleConfig | None:
    """The config of the MONAI bundle resolving an item on the current call stack, None outside a bundle."""
    # Only frames of the resolver's own methods are looked into: reading another frame's f_locals would keep
    # its objects alive (Python < 3.13 caches the snapshot on the frame).
    codes = {f.__code__ for f in vars(ReferenceResolver).values() if inspect.isfunction(f)}
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in codes and isinstance(frame.f_locals.get("self"), ReferenceResolver):
            return BundleConfig(frame.f_locals["self"])
        frame = frame.f_back
    return None
