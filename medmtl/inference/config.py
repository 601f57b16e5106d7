"""A bundle's inference config for `medmtl infer`: read ``configs/inference.yaml`` with MONAI's ConfigParser,
apply overrides, build the predictor and the batch arguments. (`monai.bundle run` reads the config itself.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medmtl.errors import MedmtlError, error_summary, innermost_cause, medmtl_cause

if TYPE_CHECKING:
    from medmtl.inference.predictor import Predictor

__all__ = ["load_inference_config", "build_from_config"]


def load_inference_config(bundle_dir: Path | str, overrides: Mapping[str, Any] | None = None) -> Any:
    """Read a bundle's ``configs/inference.yaml`` and ``metadata.json`` with MONAI's ConfigParser.

    Args:
        bundle_dir: the bundle folder (holding ``configs/``); becomes ``bundle_root``.
        overrides: config ids to values (``"pipeline#patch_size": [32, 32, 32]``), applied as
            ``monai.bundle run --key value`` would.

    Returns:
        the `monai.bundle.ConfigParser`, not yet parsed.

    Raises:
        MedmtlError: the bundle, its inference.yaml or metadata.json is missing or unreadable, or an
            override names a key that the config does not have.
    """
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    config, meta = bundle_dir / "configs" / "inference.yaml", bundle_dir / "configs" / "metadata.json"
    if not bundle_dir.is_dir():
        raise MedmtlError(f"{bundle_dir}: bundle folder not found")
    for path in (config, meta):
        if not path.is_file():
            raise MedmtlError(f"{path}: not found; is {bundle_dir} a bundle with an inference config?")
    parser = ConfigParser()
    try:
        parser.read_config(str(config))
        parser.read_meta(str(meta))
    except Exception as err:  # YAML/JSON syntax errors of several types
        raise MedmtlError(
            f"{bundle_dir}: cannot read the bundle's configs ({type(err).__name__}: {err})"
        ) from None
    parser["bundle_root"] = str(bundle_dir)
    for key, value in (overrides or {}).items():
        top = key.split("#")[0]
        if top not in parser:
            raise MedmtlError(f"{config}: has no key '{top}' (cannot set '{key}')")
        parser[key] = value
    return parser


def build_from_config(parser: Any) -> tuple[Predictor, dict[str, Any]]:
    """Instantiate the config's ``predictor`` and resolve its ``batch`` arguments for `run_batch`.

    Args:
        parser: from `load_inference_config` (overrides applied).

    Returns:
        (predictor, keyword arguments of `run_batch`).

    Raises:
        MedmtlError: from building the predictor (checkpoint missing or not fitting, bad settings), or a
            config entry that cannot be evaluated (named).
    """
    out = []
    for key in ("predictor", "batch"):
        try:
            out.append(parser.get_parsed_content(key))
        except Exception as err:  # MONAI wraps whatever the config raised in RuntimeErrors
            cause = medmtl_cause(err)
            if cause is not None:
                raise cause from None
            raise MedmtlError(
                f"inference config: cannot build '{key}' ({error_summary(innermost_cause(err), typed=True)})"
            ) from None
    return out[0], dict(out[1])
