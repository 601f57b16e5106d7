"""MONAI's bundle tools on the phantom bundle: verify_metadata (offline schema), verify_net_in_out, ckpt_export.

The commands run as subprocesses from the repository root, as a user types them; the failure cases run the same
functions in-process (fire turns their exception into a non-zero exit), which is much faster than starting MONAI
again for each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser

BUNDLE = "bundles/phantom_mtl"
META = f"{BUNDLE}/configs/metadata.json"
TRAIN = f"{BUNDLE}/configs/train.yaml"
SCHEMA = "bundles/schema/meta_schema.json"
EXPORT_SHAPE = [1, 1, 32, 32, 32]


def _bundle(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m monai.bundle ARGS` from the repository root; stdout and stderr together."""
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def _offline_env() -> dict[str, str]:
    """The current environment with every HTTP(S) request sent to a closed port, so a download would fail."""
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[key] = "http://127.0.0.1:9"
    return env


def _load_meta() -> dict:
    return json.loads((REPO_ROOT / META).read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One epoch of the phantom bundle on 6 tiny cases; the folder holds models/model.pt."""
    out = tmp_path_factory.mktemp("phantom_run")
    run = _bundle(
        "run", "training", "--config_file", TRAIN,
        "--max_epochs", "1", "--val_interval", "1",
        "--phantom#cases", "6", "--phantom#size", "32", "--pipeline#patch_size", "[32,32,32]",
        "--output_dir", str(out), "--dataset_dir", str(out / "data"),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert (out / "models" / "model.pt").is_file()
    return out


# ---- verify_metadata ----------------------------------------------------------------------------------------


def test_schema_is_a_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO_ROOT / SCHEMA).read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")
    assert "meta_schema_20240725" in schema["description"]  # says where it comes from


def test_verify_metadata_runs_offline_and_passes():
    pytest.importorskip("jsonschema", reason="verify_metadata needs jsonschema: pip install 'monai[jsonschema]'")
    schema_before = (REPO_ROOT / SCHEMA).read_bytes()
    run = _bundle("verify_metadata", "--meta_file", META, "--filepath", SCHEMA, env=_offline_env())
    assert run.returncode == 0, run.stdout[-3000:]
    assert "skipped downloading" in run.stdout
    assert "metadata is verified with no error" in run.stdout
    assert (REPO_ROOT / SCHEMA).read_bytes() == schema_before  # used as is, not replaced


def _without(path: tuple[str, ...]):
    def edit(meta: dict) -> None:
        *parents, key = path
        for p in parents:
            meta = meta[p]
        del meta[key]

    return edit


def _set(path: tuple[str, ...], value):
    def edit(meta: dict) -> None:
        *parents, key = path
        for p in parents:
            meta = meta[p]
        meta[key] = value

    return edit


IMAGE = ("network_data_format", "inputs", "image")
PRED = ("network_data_format", "outputs", "pred")


@pytest.mark.parametrize(
    "edit, message",
    [
        (_without(("task",)), "'task' is a required property"),
        (_set(("task",), 3), "3 is not of type 'string'"),
        (_set(("version",), 1.0), "1.0 is not of type 'string'"),
        (_without(("required_packages_version",)), "'required_packages_version' is a required property"),
        (_without(("network_data_format",)), "'network_data_format' is a required property"),
        (_without(("network_data_format", "outputs")), "'outputs' is a required property"),
        (_set(("optional_packages_version",), {"nibabel": "5.4.2"}), "optional_packages_version is deprecated"),
        (_without((*IMAGE, "modality")), "'modality' is a required property"),
        (_without((*PRED, "channel_def")), "'channel_def' is a required property"),
        (_set((*IMAGE, "num_channels"), "1"), "'1' is not of type 'integer'"),
        (_set((*IMAGE, "is_patch_data"), "true"), "'true' is not of type 'boolean'"),
        (_set((*IMAGE, "value_range"), [0]), "[0] is too short"),
        (_set((*PRED, "spatial_shape"), [0, 32, 32]), "0 is less than the minimum of 1"),
        (_set((*PRED, "spatial_shape"), ["32*n; import os", 32, 32]), "does not match"),
        (_set((*PRED, "channel_def"), {"background": "0"}), "does not match '^[0-9]+$'"),
    ],
)
def test_verify_metadata_rejects(tmp_path, edit, message):
    pytest.importorskip("jsonschema", reason="verify_metadata needs jsonschema: pip install 'monai[jsonschema]'")
    from monai.bundle import verify_metadata

    meta = _load_meta()
    edit(meta)
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Failed validating") as exc:
        verify_metadata(meta_file=str(broken), filepath=str(REPO_ROOT / SCHEMA))
    assert message in str(exc.value)


def test_schema_accepts_the_specification_example_shape():
    """A minimal metadata in the form the MONAI Bundle specification shows (fixed sizes, value range) passes."""
    jsonschema = pytest.importorskip("jsonschema")
    meta = _load_meta()
    meta["network_data_format"]["inputs"]["image"].update(spatial_shape=[160, 160, 160], value_range=[0, 1])
    meta["network_data_format"]["outputs"]["pred"]["spatial_shape"] = ["*", "2**n", "16*n+32"]
    jsonschema.validate(meta, json.loads((REPO_ROOT / SCHEMA).read_text()))


# ---- verify_net_in_out ----------------------------------------------------------------------------------------


def test_verify_net_in_out_passes_for_the_seg_network():
    run = _bundle(
        "verify_net_in_out", "network_seg_def", "--meta_file", META, "--config_file", TRAIN, "--device", "cpu"
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert "data shape of network is verified with no error" in run.stdout


def test_verify_net_in_out_catches_a_wrong_channel_count():
    from monai.bundle import verify_net_in_out

    with pytest.raises(ValueError, match="output channel number `3` doesn't match: `2`"):
        verify_net_in_out(
            "network_seg_def",
            meta_file=str(REPO_ROOT / META),
            config_file=str(REPO_ROOT / TRAIN),
            device="cpu",
            **{"_meta_#network_data_format#outputs#pred#num_channels": 2},
        )


# ---- ckpt_export --------------------------------------------------------------------------------------------


def test_ckpt_export_matches_the_checkpoint_and_embeds_metadata(trained):
    ts_file = trained / "model.ts"
    run = _bundle(
        "ckpt_export", "network_seg_def",
        "--filepath", str(ts_file), "--ckpt_file", str(trained / "models" / "model.pt"),
        "--meta_file", META, "--config_file", TRAIN,
        "--use_trace", "True", "--input_shape", json.dumps(EXPORT_SHAPE),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert ts_file.is_file()

    extra = {"metadata.json": "", "train.json": ""}
    exported = torch.jit.load(str(ts_file), map_location="cpu", _extra_files=extra).eval()
    assert json.loads(extra["metadata.json"]) == _load_meta()
    assert json.loads(extra["train.json"]) == ConfigParser.load_config_file(REPO_ROOT / TRAIN)

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / TRAIN))
    net = parser.get_parsed_content("network_seg_def")
    net.load_state_dict(torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True))
    net.eval()

    gen = torch.Generator().manual_seed(0)
    # the export shape, and another one: the trace must not be tied to the shape it was traced with
    for shape in (EXPORT_SHAPE, [1, 1, 64, 32, 32]):
        x = torch.rand(shape, generator=gen)
        with torch.no_grad():
            expected = net(x)
            got = exported(x)
        assert isinstance(got, torch.Tensor)
        assert got.shape == (1, 3, *shape[2:])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
