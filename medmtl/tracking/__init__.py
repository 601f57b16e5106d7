"""MLflow tracking for medmtl training: one readable MLflow run per training, resumable, PHI-safe.

One job a module:

- `tracker`: `MLflowTracker`, the ignite handler (run lifecycle, params, metrics, resume from a checkpoint);
- `bundle`: how it sits in a MONAI bundle (params from the resolved bundle config, MONAI's MLflow handler
  dropped);
- `scrub`: patient identifiers kept out of params, tags, config and tables; valid MLflow keys;
- `review`: the per-case validation table and the worst-case overlay pictures;
- `journal`: MLflow calls that never stop training, and the offline journal they fall back to;
- `sync`: `medmtl sync-mlflow`, uploading journaled runs;
- `store`: the tracking URI, the experiment, and the local MLflow UI.

The names below are the public API (bundle configs use `medmtl.tracking.<name>`).
"""

from medmtl.tracking.bundle import BundleConfig, bundle_config, drop_duplicate_mlflow_handlers
from medmtl.tracking.journal import JOURNAL_TAG, PENDING_FOLDER
from medmtl.tracking.journal import _short_http_waits as _short_http_waits  # for tests
from medmtl.tracking.review import render_overlay, write_case_table
from medmtl.tracking.scrub import flatten_params, scrub_identifiers
from medmtl.tracking.store import launch_ui, resolve_tracking_uri, ui_command
from medmtl.tracking.sync import SyncResult, sync_pending_runs
from medmtl.tracking.tracker import MLflowTracker

__all__ = [
    "BundleConfig",
    "JOURNAL_TAG",
    "MLflowTracker",
    "PENDING_FOLDER",
    "SyncResult",
    "bundle_config",
    "drop_duplicate_mlflow_handlers",
    "flatten_params",
    "launch_ui",
    "render_overlay",
    "resolve_tracking_uri",
    "scrub_identifiers",
    "sync_pending_runs",
    "ui_command",
    "write_case_table",
]
