"""MLflowTracker inside a MONAI bundle: params and `config/resolved_config.json` come from the resolved config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigParser

from medmtl.errors import MedmtlError
from medmtl.tracking import bundle_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = REPO_ROOT / "bundles" / "phantom_mtl" / "configs" / "train.yaml"


@pytest.fixture(autouse=True)
def _no_env_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_params_and_config_follow_command_line_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["optimizer#_target_"] = "torch.optim.SGD"  # as `--optimizer#_target_ torch.optim.SGD` does
    parser["max_epochs"] = 3
    parser["label_names"] = {1: "organ", 2: "lesion"}  # reads no dataset
    parser["output_dir"] = str(tmp_path)
    tracker = parser.get_parsed_content("tracker")
    params = tracker.params
    assert params["optimizer._target_"] == "torch.optim.SGD" and params["max_epochs"] == "3"
    assert params["pipeline.patch_size"] == "[64, 64, 64]" and params["loss_args.weighting"] == "fixed"
    assert params["precision"] in ("fp32", "bf16 autocast (cpu)", "fp16 amp (cuda)")  # from `params:`
    assert not any(k.startswith(("tracker.", "params.", "imports")) for k in params)
    assert "network_def" not in params  # an object, not data

    tracker.state_dict()  # starts the run
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params["optimizer._target_"] == "torch.optim.SGD"
    config = json.loads(
        Path(client.download_artifacts(run.info.run_id, "config/resolved_config.json", str(tmp_path))).read_text()
    )
    assert config["optimizer"]["_target_"] == "torch.optim.SGD" and config["max_epochs"] == 3
    assert config["network_def"].startswith("$medmtl.networks.MultiTaskUNet")  # kept as its text
    assert config["lr_schedule"]["optimizer"] == "@optimizer"
    tracker._open.end("FINISHED")


def test_bundle_config_outside_a_bundle_is_a_user_error():
    with pytest.raises(MedmtlError, match="bundle_config"):
        bundle_config()
