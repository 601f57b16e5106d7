"""The clinician's view, checked the way a person sees it: `medmtl ui` in a real headless Chromium.

A 2-epoch phantom training writes a run; `medmtl ui <out>/eval` serves it on a free loopback port; Playwright
drives Debian's `chromium` (never a downloaded browser) through the MLflow 3 UI: the experiment's run list
shows the run's readable name, the run page its description (dataset, heads, best Dice) and the Dice/HD95
metrics with their values, the artifacts view the per-case table and a worst-case overlay picture.

Every step saves a screenshot into the test's tmp folder and, when `MEDMTL_ARTIFACTS` is set, copies it to
`$MEDMTL_ARTIFACTS/clinician_view/` for CI to collect. The module skips when Playwright or Chromium is missing.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from servers import free_port, start_http_server

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (scripts/setup.sh installs it)"
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MEDMTL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; MEDMTL_CHROMIUM overrides)",
                allow_module_level=True)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TINY = ["--max_epochs", "2", "--phantom#cases", "8", "--phantom#size", "32", "--pipeline#patch_size",
        "[32,32,32]", "--num_folds", "2", "--val_interval", "1", "--num_workers", "0"]
# MLflow 3 opens experiments in its GenAI view; the classic runs/metrics/artifacts view needs this switch
# (the "Model training" toggle at the top left does the same for a person).
ML_VIEW = "workflowType=machine_learning"
TIMEOUT_MS = 60_000  # the React app renders slowly on a busy 2-core machine
# No telemetry from the UI server or the training; the store stays the bundle's own SQLite file.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# The UI server, light on a shared 2-core machine: one uvicorn worker instead of four and no background job
# runner (it serves GenAI evaluation jobs); the pages a reviewer sees are the same.
LIGHT_UI_ENV = {"MLFLOW_WORKERS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(QUIET_ENV)
    return env


def _medmtl_argv() -> list[str]:
    """The installed `medmtl` console script next to this Python, else the same entry point via -c."""
    script = Path(sys.executable).with_name("medmtl")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from medmtl.cli import main; sys.exit(main())"]


def _download(client: MlflowClient, run_id: str, artifact: str, tmp_path: Path) -> Path:
    """The logged artifact file, fetched through MLflow into `tmp_path/logged/`."""
    target = tmp_path / "logged"
    target.mkdir(exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact, str(target)))


def _snap(page, tmp_path: Path, name: str) -> Path:
    """Screenshot to `tmp_path/name.png`, copied to `$MEDMTL_ARTIFACTS/clinician_view/` when that is set."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get("MEDMTL_ARTIFACTS"):
        target = Path(os.environ["MEDMTL_ARTIFACTS"]) / "clinician_view"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / path.name)
    assert path.stat().st_size > 0
    return path


# ----------------------------------------------------------------------------------------------------------
# Fixtures: one training, one UI server, one browser for the module


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 2-epoch phantom run: its output folder, client, experiment id and run."""
    out = tmp_path_factory.mktemp("clinician_run")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(REPO_ROOT / "bundles" / "phantom_mtl" / "configs" / "train.yaml"),
           "--output_dir", str(out), "--dataset_dir", str(out / "data"), *TINY]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    client = MlflowClient(f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("phantom_mtl")
    (run,) = client.search_runs([experiment.experiment_id])
    return {"out": out, "client": client, "experiment_id": experiment.experiment_id, "run": run}


@pytest.fixture(scope="module")
def ui(trained) -> Iterator[str]:
    """`medmtl ui <out>/eval --port <free port>` running (own process group); yields its base URL."""
    port = free_port()
    server = start_http_server(
        [*_medmtl_argv(), "ui", str(trained["out"] / "eval"), "--port", str(port)],
        f"http://127.0.0.1:{port}", trained["out"] / "ui.log", health_path="/health",
        env={**_env(), **LIGHT_UI_ENV}, timeout=90,
    )
    try:
        yield server.url
    finally:
        server.stop()  # SIGTERM to the group (medmtl, mlflow, uvicorn), SIGKILL for stragglers


@pytest.fixture(scope="module")
def browser_context(ui) -> Iterator:
    """A headless Chromium context (Debian's binary), MLflow's assistant side panel kept closed."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        # The assistant panel opens itself on first load and takes a third of the width; these are the
        # UI's own local-storage switches (harmless if a later MLflow renames them: the panel just shows).
        context.add_init_script(
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            browser.close()


@pytest.fixture
def page(browser_context, request, tmp_path):
    """A fresh tab; when the test fails, what the browser showed is saved as `<test>_failure.png`."""
    failed_before = request.session.testsfailed
    page = browser_context.new_page()
    yield page
    # the call phase's report is counted before fixtures are torn down
    if request.session.testsfailed > failed_before:
        _snap(page, tmp_path, f"{request.node.name}_failure")
    page.close()


def _run_url(ui: str, trained: dict, suffix: str = "") -> str:
    return f"{ui}/#/experiments/{trained['experiment_id']}/runs/{trained['run'].info.run_id}{suffix}?{ML_VIEW}"


# ----------------------------------------------------------------------------------------------------------
# What the reviewer sees


def test_experiment_lists_the_run_by_its_readable_name(page, ui, trained, tmp_path):
    run_name = trained["run"].info.run_name
    assert run_name.startswith("phantom seg+cls+boundary ")  # readable: dataset, heads, time (not "bold-fox-123")
    page.goto(f"{ui}/#/experiments/{trained['experiment_id']}/runs?{ML_VIEW}")
    link = page.get_by_role("link", name=run_name, exact=True)
    link.wait_for(state="visible")
    assert page.get_by_text("1 matching run").is_visible()
    _snap(page, tmp_path, "01_experiment_runs")

    link.click()  # a person opens the run from the list
    page.get_by_role("tab", name="Overview").wait_for(state="visible")
    assert trained["run"].info.run_id in page.url
    assert page.get_by_text(run_name, exact=True).first.is_visible()


def test_run_page_shows_description_and_dice_hd95_metrics(page, ui, trained, tmp_path):
    client, run = trained["client"], trained["run"]
    page.goto(_run_url(ui, trained))
    page.get_by_text(run.info.run_name, exact=True).first.wait_for(state="visible")

    # the description (markdown list) names the dataset, the heads and the best Dice logged for this run
    history = client.get_metric_history(run.info.run_id, "val/mean_dice")
    best = max(history, key=lambda m: m.value)
    expected = ["dataset: phantom", "heads: seg, cls, boundary",
                f"best val/mean_dice: {best.value:.4f} (epoch {best.step})"]
    for text in expected:  # whole list items, so "heads: seg, cls" would not pass for three heads
        item = page.get_by_role("listitem").filter(has_text=re.compile(rf"^\s*{re.escape(text)}\s*$"))
        item.first.wait_for(state="visible")

    # each metric is a row of the metrics table, its value the run's latest logged value
    for key in ("val/dice_organ", "val/dice_lesion", "val/hd95_organ_mm"):
        row = page.get_by_role("row").filter(has=page.get_by_role("cell", name=key, exact=True))
        row.scroll_into_view_if_needed()
        assert row.is_visible(), key
        cells = row.get_by_role("cell").all_inner_texts()
        assert cells[0].strip() == key
        assert float(cells[1]) == pytest.approx(run.data.metrics[key], rel=1e-9), (key, cells)
    _snap(page, tmp_path, "02_run_overview")


def test_artifacts_show_the_per_case_table(page, ui, trained, tmp_path):
    client, run = trained["client"], trained["run"]
    table = "validation/cases_epoch_002.csv"
    local = _download(client, run.info.run_id, table, tmp_path)
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert len(rows) == 4

    page.goto(_run_url(ui, trained, f"/artifacts/{table}"))
    for column in ("case_id", "dice_organ", "hd95_organ_mm"):
        page.get_by_role("columnheader", name=column).first.wait_for(state="visible")
    for row in rows:  # every validation case is a table row, by its case id
        assert row["case_id"].startswith("phantom_")
        page.get_by_role("cell", name=row["case_id"], exact=True).wait_for(state="visible")
    first = rows[0]  # worst case first: its Dice is in the same table row as its id
    first_row = page.get_by_role("row").filter(has=page.get_by_role("cell", name=first["case_id"], exact=True))
    assert first["dice_organ"] in first_row.inner_text()
    _snap(page, tmp_path, "03_case_table")


def test_artifacts_show_an_overlay_picture(page, ui, trained, tmp_path):
    client, run = trained["client"], trained["run"]
    overlays = sorted(a.path for a in client.list_artifacts(run.info.run_id, "overlays/epoch_002"))
    assert overlays and all(p.endswith(".png") for p in overlays)
    worst = overlays[0]  # 01_<case>.png: the worst case by mean Dice
    with Image.open(_download(client, run.info.run_id, worst, tmp_path)) as picture:
        size = picture.size

    page.goto(_run_url(ui, trained, f"/artifacts/{worst}"))
    image = page.get_by_role("img", name=worst, exact=True)  # the artifact viewer's alt text is its path
    image.wait_for(state="visible")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    natural = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert tuple(natural) == size  # the browser decoded the logged PNG itself, not a placeholder
    box = image.bounding_box()
    assert box is not None and box["width"] > 100 and box["height"] > 100  # drawn at a readable size
    _snap(page, tmp_path, "04_overlay")
