"""The `medmtl` command line: one subcommand per user task.

Library modules do the work; this module only parses arguments, prints results and turns
`MedmtlError` into a one-line message and a non-zero exit. Heavy imports (torch, MONAI) happen inside
the subcommands so that `medmtl --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from medmtl import __version__
from medmtl.errors import MedmtlError, printable_console

EXIT_FAILED = 1  # the command ran and found problems (bad cases, failed inputs)
EXIT_ERROR = 2  # the command could not run (bad arguments, unreadable input)


def _cmd_synth(args: argparse.Namespace) -> int:
    from medmtl.data.synthetic import generate_dataset

    dataset_json = generate_dataset(
        args.out,
        cases=args.cases,
        size=args.size,
        seed=args.seed,
        dicom_cases=args.dicom,
        spatial_dims=args.spatial_dims,
        masked=args.masked,
    )
    exported = f" (+{args.dicom} held-out cases as a DICOM export)" if args.dicom else ""
    masks = f", {args.masked} with a mask, the rest with a case label only" if args.masked is not None else ""
    print(f"wrote {args.cases} phantom cases{masks}{exported}: {dataset_json}")
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from medmtl.data.checks import check_dataset

    report = check_dataset(args.dataset_dir)
    print(report.format())
    return 0 if report.ok else EXIT_FAILED


def _cmd_plan(args: argparse.Namespace) -> int:
    from medmtl.planner import write_bundle

    out = write_bundle(args.dataset_dir, args.out, device=args.device, memory_gb=args.memory_gb,
                       spatial_dims=args.spatial_dims)
    print(f"wrote the bundle {out} (the plan: {out / 'configs' / 'plans.json'}; why: {out / 'docs' / 'README.md'})")
    return 0


def _series_rule(args: argparse.Namespace):
    from medmtl.data.dicom import SeriesRule

    return SeriesRule(
        modality=args.modality,
        description=args.description,
        min_slices=args.min_slices,
        largest=args.largest,
        series_uid=args.series_uid,
    )


def _cmd_series(args: argparse.Namespace) -> int:
    from medmtl.data.dicom import discover_series, format_series_table, select_series

    series = discover_series(args.folder)
    if not series:  # a script must be able to tell "nothing there" from a listing
        raise MedmtlError(f"{args.folder}: no DICOM image series found (no file under it is a readable DICOM image)")
    rule = _series_rule(args)
    selected = select_series(series, rule) if rule.is_set() else []
    print(format_series_table(series, selected=selected))
    if rule.is_set() and not selected:
        print(f"no series matches the rule: {rule.describe()}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _parse_set(items: Sequence[str]) -> dict:
    """``KEY=VALUE`` pairs from ``--set``; values read as YAML (numbers, lists, true/false, text)."""
    import yaml

    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            example = "--set pipeline#patch_size=[32,32,32]"
            raise MedmtlError(f"--set {item!r}: expected KEY=VALUE, e.g. {example}")
        try:
            pairs[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MedmtlError(f"--set {item!r}: the value is not valid YAML") from None
    return pairs


def _cmd_infer(args: argparse.Namespace) -> int:
    from medmtl.inference.batch import (
        build_from_config,
        load_inference_config,
        merge_series_rule,
        parse_formats,
        run_batch,
    )

    overrides = _parse_set(args.set or [])
    # the options below win over --set: they are the documented way to say these things
    overrides.update(input_dir=str(args.input), output_dir=str(args.output))
    if args.model:
        # several checkpoints (e.g. the folds of a cross-validation) are averaged as an ensemble
        overrides["ckpt_file"] = str(args.model[0]) if len(args.model) == 1 else [str(m) for m in args.model]
    if args.overlap is not None:
        overrides["overlap"] = args.overlap
    if args.tta:
        overrides["tta"] = True
    if args.device is not None:
        overrides["device"] = args.device
    if args.formats is not None:
        overrides["formats"] = parse_formats(args.formats)
    if args.save_maps:
        overrides["save_maps"] = True
    if args.quiet:
        overrides["quiet"] = True
    if args.overwrite:
        overrides["overwrite"] = True
    parser = load_inference_config(args.bundle, overrides)
    cli_rule = {
        "modality": args.modality, "description": args.description, "min_slices": args.min_slices,
        "largest": args.largest, "series_uid": args.series_uid,
    }  # fmt: skip
    parser["batch#rule"] = merge_series_rule(parser.get("_meta_", {}).get("input_series"), cli_rule)
    predictor, batch = build_from_config(parser)
    summary = run_batch(predictor, **batch)
    return 0 if summary.ok else EXIT_FAILED


def _cmd_package(args: argparse.Namespace) -> int:
    from medmtl.packaging import package_bundle

    result = package_bundle(
        args.bundle, args.model, args.out, metrics_file=args.metrics, with_metrics=not args.no_eval_metrics,
        weights_url=args.weights_url,
    )
    figures = ", ".join(f"{k} {v}" for k, v in result.eval_metrics.items() if k.startswith("mean_"))
    print(f"bundle: {result.bundle_dir}" + (f" ({figures})" if figures else ""))
    print(f"zip: {result.zip_file}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from medmtl.tracking import launch_ui

    process = launch_ui(args.store, host=args.host, port=args.port)
    # MLflow 3 opens experiments in its GenAI view; this link opens the training-runs view directly
    url = f"http://{args.host}:{args.port}/#/experiments?workflowType=machine_learning"
    print(f"MLflow UI for {args.store} at {url} (Ctrl-C to stop)", flush=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # stopping `medmtl ui` stops the server it started
    try:
        return process.wait()
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGTERM)  # the server runs in its own session, workers included
        process.wait()
        return 0


def _cmd_sync_mlflow(args: argparse.Namespace) -> int:
    from medmtl.tracking import sync_pending_runs

    results = sync_pending_runs(args.eval_dir, tracking_uri=args.tracking_uri)
    if not results:
        print(f"{args.eval_dir}: no pending MLflow runs (nothing to sync)")
        return 0
    for result in results:
        if result.ok:
            print(f"synced {result.journal.name}: {result.records} records -> run {result.run_id}")
        else:
            print(f"medmtl sync-mlflow: not uploaded: {result.error}", file=sys.stderr)
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} of {len(results)} journals uploaded to {results[0].store}")
    if failed:
        print("medmtl sync-mlflow: run it again once the store is reachable (it resumes safely)", file=sys.stderr)
        return EXIT_FAILED
    return 0


def add_series_rule_options(parser: argparse.ArgumentParser) -> None:
    """Add the series selection options shared by `series` and `infer`."""
    group = parser.add_argument_group("series selection")
    group.add_argument("--modality", help="keep series of this DICOM Modality (e.g. MR, CT)")
    group.add_argument("--description", metavar="REGEX", help="keep series whose SeriesDescription matches")
    group.add_argument("--min-slices", type=int, default=None, help="keep series with at least N slices")
    group.add_argument("--largest", action="store_true", help="of the series kept, take the one with most voxels")
    group.add_argument("--series-uid", help="take exactly this SeriesInstanceUID")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `medmtl` command."""
    parser = argparse.ArgumentParser(
        prog="medmtl", description="Multi-task medical image segmentation on MONAI."
    )
    parser.add_argument("--version", action="version", version=f"medmtl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "synth",
        help="generate the phantom dataset (MSD layout, optional DICOM scanner export)",
        description="Generate a deterministic MR-like phantom dataset in MSD layout: an organ (label 1), "
        "a lesion (label 2) in about half the cases, bias field, noise and intensity scale.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (must be empty or absent)")
    p.add_argument("--cases", type=int, default=48, help="number of cases (default 48)")
    p.add_argument("--size", type=int, default=64, help="edge length in voxels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dicom", type=int, default=0, metavar="K", help="also write K cases as a DICOM study export")
    p.add_argument("--spatial-dims", type=int, choices=(2, 3), default=3, help="3D volumes or 2D images")
    p.add_argument("--masked", type=int, metavar="K",
                   help="partially labelled: only the first K cases keep their masks, the others only their "
                   "lesion-present class (default: all masked)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "check-data",
        help="validate an MSD dataset folder and print a per-case report",
        description="Check every image/label pair of an MSD dataset (dataset.json): readable, shapes and "
        "affines agree, label values declared, no NaN/Inf, sane spacing. Exits 1 if anything is wrong.",
    )
    p.add_argument("dataset_dir", type=Path, help="folder holding dataset.json")
    p.set_defaults(func=_cmd_check_data)

    p = sub.add_parser(
        "plan",
        help="fingerprint an MSD dataset once and write a bundle that trains on it (OUT/configs/plans.json)",
        description="Check DATASET_DIR as check-data does, read every training case once (spacings, shapes, "
        "foreground intensities, labels, case classes) and decide, with nnU-Net v2's rules, target spacing, "
        "normalisation, patch size, strides, batch size and heads. Writes a complete bundle into OUT: "
        "configs/plans.json (the plan: pipeline and network_args, which every config of the bundle reads, and why "
        "each value was chosen), metadata.json, train.yaml, inference.yaml, evaluate.yaml, multi_gpu_train.yaml, "
        "docs/README.md and LICENSE. OUT must be new or empty; nothing is overwritten.",
    )
    p.add_argument("dataset_dir", type=Path, help="folder holding dataset.json")
    p.add_argument("--out", type=Path, required=True, help="new bundle folder (must be empty or absent)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu",
                   help="plan the network for a GPU (nnU-Net's widths, default) or a CPU (half widths)")
    p.add_argument("--memory-gb", type=float, metavar="G",
                   help="memory budget for activations (default 8 on gpu, as nnU-Net; 4 on cpu)")
    p.add_argument("--spatial-dims", type=int, choices=(2, 3),
                   help="network dimension (default: 3, or 2 for very anisotropic volumes and 2D images)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "series",
        help="list the DICOM series under a folder tree, flag problems, apply a selection rule",
        description="Find every DICOM series under FOLDER (any file names, nested folders), group by "
        "SeriesInstanceUID and print one line per series with the problems found. Exits 2 if none is found, 1 if "
        "none matches the selection rule.",
    )
    p.add_argument("folder", type=Path, help="a DICOM export: study folder, series folder or any tree")
    add_series_rule_options(p)
    p.set_defaults(func=_cmd_series)

    p = sub.add_parser(
        "infer",
        help="segment NIfTI files, DICOM series or a whole scanner export with a bundle",
        description="Segment every input under INPUT (a NIfTI file, a folder of NIfTI files, a DICOM series "
        "folder or an export tree; DICOM series chosen by the bundle's metadata.json \"input_series\" or the "
        "options below) with the bundle's configs/inference.yaml. Writes OUT/<name>/seg.nii.gz, seg.dcm "
        "(DICOM inputs), report.json per input. Exits 1 if any input failed, 2 if INPUT holds no NIfTI image and "
        "no DICOM image series.",
    )
    p.add_argument("input", type=Path, help="NIfTI file, folder of NIfTI files, DICOM series or export tree")
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder (with configs/inference.yaml)")
    p.add_argument("--model", type=Path, nargs="+", metavar="CKPT",
                   help="checkpoint (default: BUNDLE/models/model.pt); several (e.g. 5 folds) make an ensemble")
    p.add_argument("--output", type=Path, required=True, help="output folder (outside INPUT)")
    p.add_argument("--overlap", type=float, help="sliding-window overlap (bundle default 0.5)")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (8x slower for 3D)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    p.add_argument("--formats", help="comma-separated outputs among nifti,dicom-seg,report (default all)")
    p.add_argument("--save-maps", action="store_true", help="also write probability and boundary maps")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info lines (errors still print)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier medmtl outputs of the same inputs (nothing else is ever replaced)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override an inference.yaml key (YAML value), e.g. pipeline#patch_size=[32,32,32]")
    add_series_rule_options(p)
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser(
        "package",
        help="write a trained bundle the MONAI model zoo accepts (configs, model.pt, model.ts, docs) and a zip",
        description="Package BUNDLE with a trained checkpoint into OUT: configs with metadata.json carrying the "
        "installed versions and the run's evaluation figures (RUN/eval/metrics.json, from evaluate.yaml), "
        "models/model.pt and models/model.ts (TorchScript of network_def), docs and licences; and "
        "<name>_v<version>.zip beside OUT. Refuses an existing non-empty OUT and a checkpoint that does not fit "
        "the bundle's network.",
    )
    p.add_argument("bundle", type=Path, help="source bundle folder, e.g. bundles/phantom_mtl")
    p.add_argument("--model", type=Path, required=True, metavar="CKPT",
                   help="the run's checkpoint, RUN/models/model.pt")
    p.add_argument("--out", type=Path, required=True, help="new bundle folder (must not exist or be empty)")
    p.add_argument("--metrics", type=Path, metavar="FILE",
                   help="evaluation report to take eval_metrics from (default: RUN/eval/metrics.json)")
    p.add_argument("--no-eval-metrics", action="store_true",
                   help="leave eval_metrics out of metadata.json instead of requiring an evaluation report")
    p.add_argument("--weights-url", metavar="URL",
                   help="folder URL where model.pt and model.ts will be downloadable: writes large_files.yml")
    p.set_defaults(func=_cmd_package)

    p = sub.add_parser(
        "ui",
        help="start the MLflow UI on a run's tracking store (127.0.0.1 by default)",
        description="Serve the MLflow UI for a training output: an eval folder holding mlruns.db (e.g. "
        "bundles/phantom_mtl/eval or <output_dir>/eval), a .db file or a database URI.",
    )
    p.add_argument("store", nargs="?", default="bundles/phantom_mtl/eval",
                   help="eval folder, .db file or URI (default: bundles/phantom_mtl/eval)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser(
        "sync-mlflow",
        help="upload the runs a training kept locally while its MLflow store was unreachable",
        description="Replay the journals in EVAL_DIR/mlflow_pending (written when the tracking store could not "
        "be reached) into an MLflow store: the run with its params, metrics (original steps and timestamps), "
        "artifacts, tags and final status. Uploaded journals are renamed *.jsonl.synced, so running it again "
        "does nothing; an interrupted sync is resumed by running it again. Exits 1 if anything was not uploaded.",
    )
    p.add_argument("eval_dir", type=Path, help="the training's eval folder (holding mlflow_pending/)")
    p.add_argument("--tracking-uri", help="store to upload to (default: MLFLOW_TRACKING_URI, else EVAL_DIR/mlruns.db)")
    p.set_defaults(func=_cmd_sync_mlflow)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `medmtl` command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    printable_console()  # a file name in another encoding must not crash the last line of a run
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except MedmtlError as err:
        if args.debug:
            raise
        print(f"medmtl {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"medmtl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
