"""The MLflow store of a training: which tracking URI it uses, its experiment, and the local MLflow UI on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from monai.utils import path_to_sqlite_uri

from medmtl.errors import MedmtlError

DB_NAME = "mlruns.db"  # the SQLite store inside an eval folder, as MONAI's `--tracking mlflow` names it
ARTIFACT_FOLDER = "mlruns"  # artifacts next to the database, as MONAI's MLFlowHandler keeps them
_REMOTE_SCHEMES = ("http", "https", "databricks")  # tracking servers: they own where artifacts go


def resolve_tracking_uri(eval_dir: Path | str, tracking_uri: str | None = None) -> str:
    """The MLflow tracking URI a training uses.

    Args:
        eval_dir: the training's output folder; the default store is `<eval_dir>/mlruns.db`.
        tracking_uri: an explicit URI from the config; wins over everything else when set.

    Returns:
        `tracking_uri` if set, else the `MLFLOW_TRACKING_URI` environment variable if set, else the SQLite URI
        of `<eval_dir>/mlruns.db` (absolute, `sqlite:////abs/path/mlruns.db` on POSIX).

    Raises:
        MedmtlError: the chosen value is a folder or `file:` URI, which MLflow 3.13+ no longer accepts as
            a tracking store (unless `MLFLOW_ALLOW_FILE_STORE=true`).
    """
    if tracking_uri:
        source, uri = "tracking_uri", str(tracking_uri)
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        source, uri = "MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"]
    else:
        return path_to_sqlite_uri(Path(eval_dir) / DB_NAME)
    scheme = urlsplit(uri).scheme
    file_store_allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes")
    # A one-letter scheme is a Windows drive ("C:/runs"), i.e. a folder; plain "databricks" is a valid URI.
    is_folder = (len(scheme) <= 1 and not uri.startswith("databricks")) or scheme == "file"
    if is_folder and not file_store_allowed:
        raise MedmtlError(
            f"{source} {_redact(uri)!r}: MLflow 3.13+ no longer accepts a folder (file store) as tracking "
            f"store; use a database URI such as {path_to_sqlite_uri(Path(eval_dir) / DB_NAME)!r} or a "
            "server URI such as http://127.0.0.1:5000"
        )
    return uri


def ui_command(eval_dir_or_uri: str | Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The argv of `mlflow ui` for the runs of one eval folder or tracking store.

    Args:
        eval_dir_or_uri: an eval folder holding `mlruns.db`, the `.db` file itself, or a database URI
            (`sqlite:///...`, `postgresql://...`).
        host: interface to bind; keep 127.0.0.1 unless the UI must be reached from other machines.
        port: port to listen on.

    Returns:
        `[python, -m, mlflow, ui, --backend-store-uri, URI, --host, HOST, --port, PORT]`, plus
        `--default-artifact-root <folder of the db>/mlruns` for SQLite stores so that experiments created
        from the UI keep their artifacts next to the database instead of the current directory.

    Raises:
        MedmtlError: the folder has no `mlruns.db`, the path does not exist, or the URI is a tracking
            server (which already is a UI) or a file store.
    """
    store_uri, artifact_root = _ui_store(eval_dir_or_uri)
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        store_uri,
        "--host",
        str(host),
        "--port",
        str(int(port)),
    ]
    if artifact_root:
        argv += ["--default-artifact-root", artifact_root]
    return argv + ["--workers", "1"]  # one person's local UI: 1 worker starts in seconds, 4 take ~30 s here


def launch_ui(eval_dir_or_uri: str | Path, host: str = "127.0.0.1", port: int = 5000) -> subprocess.Popen:
    """Start the MLflow UI on the runs of an eval folder or tracking store.

    Args:
        eval_dir_or_uri: see `ui_command`.
        host: interface to bind.
        port: port to listen on.

    Returns:
        The running `mlflow ui` process; the caller waits on it or terminates it.

    Raises:
        MedmtlError: see `ui_command`.
    """
    # MLflow's background job runner starts several processes that the UI of training runs never uses
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(ui_command(eval_dir_or_uri, host=host, port=port), env=env, start_new_session=True)


def _ui_store(eval_dir_or_uri: str | Path) -> tuple[str, str | None]:
    """(backend store URI, default artifact root or None) for `mlflow ui`."""
    text = str(eval_dir_or_uri)
    scheme = urlsplit(text).scheme if isinstance(eval_dir_or_uri, str) else ""
    if len(scheme) > 1:  # a URI; one letter would be a Windows drive
        if scheme in _REMOTE_SCHEMES:
            raise MedmtlError(f"{_redact(text)}: is a tracking server, open it in a browser instead")
        if scheme == "file":
            raise MedmtlError(f"{text}: a file store; MLflow 3.13+ needs a database (sqlite:///.../mlruns.db)")
        db = _sqlite_path(text)
        return text, (db.parent / ARTIFACT_FOLDER).as_uri() if db is not None else None
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / DB_NAME
        if not path.is_file():
            raise MedmtlError(f"{path.parent}: no {DB_NAME} here (no MLflow run has been recorded in it)")
    elif not path.is_file():
        raise MedmtlError(f"{path}: not found")
    path = path.absolute()
    return path_to_sqlite_uri(path), (path.parent / ARTIFACT_FOLDER).as_uri()


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, None for other URIs or in-memory databases."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(unquote(uri[len("sqlite:///") :].split("?")[0])).absolute()


def _redact(uri: str) -> str:
    """`uri` without a password, fit for logs (database URIs often carry one)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created (with `artifact_location`) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as err:  # another process created it meanwhile
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise MedmtlError(f"MLflow experiment {name!r} is deleted; restore it or use another name")
    return experiment.experiment_id
