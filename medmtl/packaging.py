"""`medmtl package`: a trained, self-describing MONAI bundle, in the form the MONAI model zoo accepts.

From a source bundle (``bundles/<name>``) and one training run's checkpoint it writes a new folder:

- ``configs/`` (all of the bundle's configs) with ``metadata.json`` rewritten: the versions of MONAI, PyTorch,
  NumPy and the required packages actually installed, and ``eval_metrics`` read from that run's evaluation
  (``RUN/eval/metrics.json``, written by ``evaluate.yaml``; never a placeholder);
- ``models/model.pt`` (the network weights alone, also from a ``last.pt``) and ``models/model.ts`` (TorchScript
  of ``network_def``, the segmentation-only network, by MONAI's ``ckpt_export``; checked against the eager
  network on a random input);
- ``docs/`` and ``LICENSE`` (and ``docs/data_license.txt`` where the bundle has one), the docs' README with a
  "This package" section saying where the weights and figures come from;
- ``large_files.yml`` when a download location is given (``weights_url``): the zoo keeps weights out of its
  repository and lists them there with a URL and a SHA-256 hash;

and a zip of it beside the folder (``<name>_v<version>.zip``, the bundle under a ``<name>/`` folder, as
``monai.bundle download`` unpacks it). Nothing is ever overwritten: an existing non-empty folder or zip is
refused, and the folder appears only when it is complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from medmtl.errors import MedmtlError
from medmtl.io import atomic_write

__all__ = [
    "PackageResult", "installed_versions", "package_bundle", "read_eval_metrics", "write_json", "write_large_files",
]

#: files and folders of a source bundle that a package never takes: what training runs write there
_RUN_OUTPUTS = ("models", "eval", "data", "runs", "__pycache__")
_METRIC_PREFIX = "val/"


@dataclass
class PackageResult:
    """What `package_bundle` wrote.

    Attributes:
        bundle_dir: the packaged bundle folder.
        zip_file: the zip of it.
        eval_metrics: the figures written to metadata.json (empty when left out).
        notes: things the user should know, in words.
    """

    bundle_dir: Path
    zip_file: Path
    eval_metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def write_json(data: Mapping[str, Any], path: Path | str) -> None:
    """Write JSON the way the model zoo's pre-commit hook (pretty-format-json) wants it: indent 4, ASCII, newline."""
    Path(path).write_text(json.dumps(data, indent=4, ensure_ascii=True) + "\n", encoding="utf-8")


def _version(distribution: str) -> str | None:
    try:
        version = importlib_metadata.version(distribution)
    except importlib_metadata.PackageNotFoundError:
        return None
    return version.split("+")[0]  # "2.13.0+cpu" -> "2.13.0": the release, not the local build tag


def installed_versions(required: Mapping[str, str]) -> dict[str, Any]:
    """The metadata.json version entries for what is installed here.

    Args:
        required: the bundle's ``required_packages_version`` (its keys are the packages looked up).

    Returns:
        ``monai_version``, ``pytorch_version``, ``numpy_version`` and ``required_packages_version``.

    Raises:
        MedmtlError: a required package is not installed.
    """
    packages = {}
    for name in required:
        version = _version(name)
        if version is None:
            raise MedmtlError(f"required package {name!r} of the bundle is not installed here")
        packages[name] = version
    return {
        "monai_version": _version("monai"),
        "pytorch_version": _version("torch"),
        "numpy_version": _version("numpy"),
        "required_packages_version": packages,
    }


def read_eval_metrics(metrics_file: Path, model: Path) -> dict[str, float]:
    """The aggregate figures of an evaluation of `model`, as metadata.json ``eval_metrics``.

    Args:
        metrics_file: ``eval/metrics.json`` written by the bundle's ``evaluate.yaml``.
        model: the checkpoint being packaged; the report must be of this file and newer than it.

    Returns:
        {metric: value} without the ``val/`` prefix (``mean_dice``, ``dice_<structure>``, ``hd95_<structure>_mm``,
        ...), rounded to 4 digits; metrics without a value (NaN) are left out.

    Raises:
        MedmtlError: the report is unreadable, of another checkpoint, older than the checkpoint, or has no figure.
    """
    try:
        report = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MedmtlError(f"{metrics_file}: not a readable evaluation report ({err})") from None
    if not isinstance(report, Mapping) or not isinstance(report.get("metrics"), Mapping):
        raise MedmtlError(f"{metrics_file}: not an evaluation report (no 'metrics' entry)")
    evaluated = report.get("checkpoint")
    if isinstance(evaluated, str) and evaluated:
        path = Path(evaluated)
        # a relative path is relative to where the evaluation ran: when it does not resolve here, the name decides
        if (path.resolve() != model.resolve()) if path.exists() else (path.name != model.name):
            raise MedmtlError(f"{metrics_file}: evaluates {evaluated}, not {model}")
    if metrics_file.stat().st_mtime < model.stat().st_mtime:
        raise MedmtlError(f"{metrics_file}: older than {model}; evaluate the checkpoint again")
    figures = {
        str(key).removeprefix(_METRIC_PREFIX): round(float(value), 4)
        for key, value in report["metrics"].items()
        if isinstance(value, (int, float)) and value == value  # NaN != NaN: no figure
    }
    if not figures:
        raise MedmtlError(f"{metrics_file}: holds no metric values")
    return figures


def _refuse_existing(path: Path) -> None:
    if path.is_dir() and any(path.iterdir()):
        raise MedmtlError(f"{path}: exists and is not empty; choose a new --out (nothing is ever overwritten)")
    if path.exists() and not path.is_dir():
        raise MedmtlError(f"{path}: exists and is not a folder; choose a new --out")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _export_torchscript(work: Path, network: Any, patch_size: list[int], in_channels: int) -> None:
    """``models/model.ts`` by MONAI's ckpt_export (scripting, metadata and configs embedded), checked."""
    import torch
    from monai.bundle import ckpt_export

    ts_file = work / "models" / "model.ts"
    # ckpt_export logs its whole input summary at INFO: not news for someone running medmtl package
    export_log = logging.getLogger("monai.bundle.scripts")
    level = export_log.level
    export_log.setLevel(logging.WARNING)
    try:
        ckpt_export(
            net_id="network_def",
            filepath=str(ts_file),
            ckpt_file=str(work / "models" / "model.pt"),
            meta_file=str(work / "configs" / "metadata.json"),
            config_file=str(work / "configs" / "inference.yaml"),
            bundle_root=str(work),
        )
    finally:
        export_log.setLevel(level)
    exported = torch.jit.load(str(ts_file), map_location="cpu").eval()
    x = torch.rand(1, in_channels, *patch_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network.eval()(x)
        got = exported(x)
    if not isinstance(got, torch.Tensor) or not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise MedmtlError(f"{ts_file}: the exported TorchScript model does not match the eager network")


def write_large_files(bundle_dir: Path | str, weights_url: str) -> Path:
    """Write the zoo's ``large_files.yml``: where each weights file will be downloadable, and its SHA-256.

    Args:
        bundle_dir: a packaged bundle (``models/model.pt`` and ``models/model.ts``).
        weights_url: the folder URL the two files will be uploaded to.

    Returns:
        the file written.
    """
    work = Path(bundle_dir)
    lines = ["large_files:"]
    for name in ("model.pt", "model.ts"):
        path = work / "models" / name
        lines += [
            f'  - path: "models/{name}"',
            f'    url: "{weights_url.rstrip("/")}/{name}"',
            f'    hash_val: "{_sha256(path)}"',
            '    hash_type: "sha256"',
        ]
    target = work / "large_files.yml"
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def _provenance_section(model: Path, meta: Mapping[str, Any], metrics_file: Path | None) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in meta.get("eval_metrics", {}).items())
    figures = (
        f"Validation figures of this checkpoint (`{metrics_file.name}` of its run, written by `evaluate.yaml`):\n\n"
        f"| metric | value |\n| --- | --- |\n{rows}\n"
        if rows and metrics_file is not None
        else "No evaluation figures were packaged with this checkpoint.\n"
    )
    versions = ", ".join(
        [f"MONAI {meta['monai_version']}", f"PyTorch {meta['pytorch_version']}", f"NumPy {meta['numpy_version']}"]
        + [f"{k} {v}" for k, v in meta["required_packages_version"].items()]
    )
    return (
        f"\n## This package\n\n"
        f"Packaged by `medmtl package` on {datetime.date.today().isoformat()} from the checkpoint `{model.name}` "
        f"of the run `{model.resolve().parent.parent.name}`, with {versions}. `models/model.pt` holds the network "
        f"weights (all heads); `models/model.ts` is `network_def` (segmentation logits only) as TorchScript.\n\n"
        f"{figures}"
    )


def package_bundle(
    bundle: Path | str,
    model: Path | str,
    out: Path | str,
    metrics_file: Path | str | None = None,
    with_metrics: bool = True,
    weights_url: str | None = None,
) -> PackageResult:
    """Write a trained bundle from a source bundle and a checkpoint, and a zip of it (module docstring).

    Args:
        bundle: the source bundle folder (``configs/inference.yaml``, ``configs/metadata.json``, ``LICENSE``).
        model: the checkpoint: a run's ``models/model.pt`` (or a ``last.pt``); it must fit the bundle's network.
        out: the new bundle folder; must not exist or be empty.
        metrics_file: the evaluation report to read ``eval_metrics`` from (default: ``RUN/eval/metrics.json``
            for ``RUN/models/<model>``).
        with_metrics: False leaves ``eval_metrics`` out instead of requiring an evaluation report.
        weights_url: where ``models/model.pt`` and ``model.ts`` will be downloadable (a folder URL): writes
            ``large_files.yml`` with their URLs and SHA-256 hashes.

    Returns:
        the package folder, its zip, the figures written and notes.

    Raises:
        MedmtlError: a missing bundle or checkpoint, an existing output, a checkpoint that does not fit the
            network, a missing or foreign evaluation report, or an export that fails.
    """
    import torch

    from medmtl.engine.checkpoint import load_network_weights
    from medmtl.inference.batch import load_inference_config

    bundle, model, out = Path(bundle), Path(model), Path(out)
    if not (bundle / "configs" / "metadata.json").is_file() or not (bundle / "configs" / "inference.yaml").is_file():
        raise MedmtlError(f"{bundle}: not a bundle (configs/inference.yaml and configs/metadata.json needed)")
    if not model.is_file():
        raise MedmtlError(f"{model}: checkpoint not found")
    _refuse_existing(out)
    source_meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    name, version = source_meta.get("name", bundle.name), source_meta["version"]
    zip_file = out.parent / f"{name}_v{version}.zip"
    if zip_file.exists():
        raise MedmtlError(f"{zip_file}: exists; choose another --out folder (nothing is ever overwritten)")

    parser = load_inference_config(bundle)
    if "multitask_network_def" not in parser or "network_def" not in parser:
        raise MedmtlError(f"{bundle}: configs/inference.yaml lacks network_def or multitask_network_def")
    network = parser.get_parsed_content("multitask_network_def")
    seg_network = parser.get_parsed_content("network_def")
    load_network_weights(model, network)  # refuses a checkpoint of another network before anything is written
    state = dict(network.state_dict())
    seg_network.load_state_dict(state, strict=True)

    notes = []
    metrics: dict[str, float] = {}
    if with_metrics:
        report = Path(metrics_file) if metrics_file else model.resolve().parent.parent / "eval" / "metrics.json"
        if not report.is_file():
            raise MedmtlError(
                f"{report}: no evaluation of this checkpoint; run the bundle's evaluate.yaml on it (writes "
                "eval/metrics.json), or give --metrics FILE, or --no-eval-metrics to leave eval_metrics out"
            )
        metrics = read_eval_metrics(report, model)
    else:
        report = None
        notes.append("eval_metrics left out of metadata.json (--no-eval-metrics)")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ignore = shutil.ignore_patterns(*_RUN_OUTPUTS, "*.pyc")
        for item in sorted(bundle.iterdir()):
            if item.name in _RUN_OUTPUTS or item.name.startswith("."):
                continue
            target = work / item.name
            shutil.copytree(item, target, ignore=ignore) if item.is_dir() else shutil.copy2(item, target)
        (work / "models").mkdir()
        torch.save(state, work / "models" / "model.pt")

        meta = dict(source_meta)
        meta.update(installed_versions(source_meta.get("required_packages_version", {})))
        meta.pop("eval_metrics", None)
        if metrics:
            # after "pred_classes", where the zoo's bundles have it
            keys = list(meta)
            at = keys.index("pred_classes") + 1 if "pred_classes" in keys else len(keys)
            meta = {**{k: meta[k] for k in keys[:at]}, "eval_metrics": metrics, **{k: meta[k] for k in keys[at:]}}
        write_json(meta, work / "configs" / "metadata.json")

        patch_size = [int(s) for s in parser.get_parsed_content("pipeline#patch_size")]
        in_channels = int(parser.get_parsed_content("network_args#in_channels"))
        _export_torchscript(work, seg_network, patch_size, in_channels)
        if weights_url:
            write_large_files(work, weights_url)
            notes.append(
                f"large_files.yml: upload models/model.pt and models/model.ts to {weights_url} (the zoo's "
                "repository takes the bundle without them)"
            )
        readme = work / "docs" / "README.md"
        if readme.is_file():
            readme.write_text(
                readme.read_text(encoding="utf-8").rstrip("\n") + "\n" + _provenance_section(model, meta, report),
                encoding="utf-8",
            )

        if out.is_dir():
            out.rmdir()  # empty (checked above): the finished folder takes its place
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _zip(out, zip_file, name)
    return PackageResult(bundle_dir=out, zip_file=zip_file, eval_metrics=metrics, notes=notes)


def _zip(folder: Path, zip_file: Path, name: str) -> None:
    """Zip `folder` with its files under ``<name>/``, through medmtl's atomic writer (never over a file)."""

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, f"{name}/{path.relative_to(folder).as_posix()}")

    atomic_write(zip_file, write, overwrite=False)
