"""Real servers for tests: a throw-away PostgreSQL cluster and HTTP services such as `mlflow server`.

`start_mlflow_server` runs the team's `scripts/mlflow_server.sh`, so tests start the server the README shows.

Nothing here is a fixture, so any test module can build its own around these helpers:

```python
cluster = start_postgres(databases=["mlflow"])          # skip first if postgres_skip_reason() says so
server = start_mlflow_server(cluster.uri("mlflow"), tmp / "artifacts", tmp / "mlflow.log")
...                                                     # talk to server.url
server.stop(); cluster.stop()
```

`start_http_server` runs any command that serves HTTP (e.g. `medmtl ui`) in its own process group, waits until
a URL answers, and `ServerProcess.stop` ends the whole group (uvicorn and gunicorn fork workers).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOCALHOST = "127.0.0.1"
PG_OS_USER = "postgres"  # Debian's `postgresql` package creates this system user
PG_SUPERUSER = "postgres"  # the database superuser of a test cluster (initdb -U)
MLFLOW_SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mlflow_server.sh"


# ----------------------------------------------------------------------------------------------------------
# HTTP servers


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that nothing listens on right now.

    Args:
        host: the interface the server will bind.

    Returns:
        The port number (another process may still take it before the server binds it; rare on loopback).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class ServerProcess:
    """A server started by `start_http_server`: its process (leader of its own group), URL and log file."""

    proc: subprocess.Popen
    url: str
    log_file: Path

    def alive(self) -> bool:
        """Whether the server or any process of its group (forked workers) still runs."""
        return process_group_alive(self.proc.pid)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's combined stdout/stderr.

        Args:
            chars: how many characters.

        Returns:
            The text ("" when the log cannot be read).
        """
        return _tail(self.log_file, chars)

    def stop(self, timeout: float = 15.0) -> None:
        """End the server and every process it forked (SIGTERM to its group, SIGKILL after `timeout`).

        Safe to call twice.

        Args:
            timeout: seconds to wait for a clean exit.
        """
        pgid = self.proc.pid  # start_new_session=True made the server the leader of its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        # Workers may outlive the leader for a moment; whatever is left of the group is killed.
        deadline = time.monotonic() + timeout
        while process_group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def process_group_alive(pgid: int) -> bool:
    """Whether any process of a process group still runs.

    Zombies do not count: in a container whose init does not reap orphans they would linger forever.

    Args:
        pgid: the group id (the pid of a process started with `start_new_session=True`).

    Returns:
        True while at least one member that is not a zombie exists.
    """
    proc_root = Path("/proc")
    if not (proc_root / "self" / "stat").is_file():  # no procfs: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in proc_root.glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and ")", so split after the last ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_for_http(
    url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None, log_file: Path | None = None
) -> None:
    """Wait until `url` answers a GET with status 200.

    Args:
        url: the URL to poll (e.g. `http://127.0.0.1:5000/health`).
        timeout: seconds before giving up.
        proc: the server process; waiting stops early if it exits.
        log_file: the server's log, quoted in the error.

    Raises:
        RuntimeError: the process exited or `timeout` passed; the message ends with the log's tail.
    """
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server exited with code {proc.returncode} before {url} answered:\n"
                + (_tail(log_file) if log_file else "")
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as err:  # refused while starting, HTTPError 4xx/5xx
            last_error = str(err)
        time.sleep(0.25)
    raise RuntimeError(
        f"{url} did not answer within {timeout:.0f} s ({last_error}):\n"
        + (_tail(log_file) if log_file else "")
    )


def start_http_server(
    argv: Sequence[str],
    url: str,
    log_file: Path | str,
    *,
    health_path: str = "/",
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float = 60.0,
) -> ServerProcess:
    """Start a command that serves HTTP and wait until it answers.

    Args:
        argv: the command (e.g. `[sys.executable, "-m", "medmtl.cli", "ui", ...]`).
        url: the server's base URL, e.g. `http://127.0.0.1:5123`.
        log_file: file for the command's stdout and stderr.
        health_path: path polled until it answers 200 (`/health` for MLflow).
        env: the command's environment (default: this process's).
        cwd: working folder (default: the folder of `log_file`, so stray files land next to it).
        timeout: seconds to wait for the first answer.

    Returns:
        The running server; call `stop()` (or use it as a context manager).

    Raises:
        RuntimeError: the command exited or did not answer in time (the server is stopped first).
    """
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=str(cwd or log_file.parent),
            start_new_session=True,  # its own process group: stop() ends the workers it forks too
        )
    server = ServerProcess(proc=proc, url=url.rstrip("/"), log_file=log_file)
    try:
        wait_for_http(server.url + health_path, timeout=timeout, proc=proc, log_file=log_file)
    except BaseException:
        server.stop()
        raise
    return server


def start_mlflow_server(
    backend_store_uri: str,
    artifacts_dir: Path | str,
    log_file: Path | str,
    *,
    port: int | None = None,
    workers: int = 1,
    timeout: float = 90.0,
) -> ServerProcess:
    """Start the team's tracking server, `scripts/mlflow_server.sh`, on 127.0.0.1 with this Python.

    The script is what the README tells a team to run, so tests exercise the same command: `mlflow server`
    with proxied artifacts (clients log through the server, `mlflow-artifacts:/` URIs; the files land in
    `artifacts_dir`) and MLflow's background job runner off (a handful of huey consumers medmtl does not use).
    The security middleware stays on; its defaults accept 127.0.0.1.

    Args:
        backend_store_uri: e.g. `PostgresCluster.uri("mlflow")`, a bare `postgresql://...` (the script names
            the psycopg2 driver) or `sqlite:///.../mlflow.db`.
        artifacts_dir: the server's `--artifacts-destination` folder.
        log_file: file for the server's output.
        port: port to listen on (default: a free one).
        workers: uvicorn worker processes.
        timeout: seconds to wait for `/health` (the first start creates the database tables).

    Returns:
        The running server; `url` is `http://127.0.0.1:<port>`.
    """
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        PYTHON=sys.executable,
        MLFLOW_BACKEND_STORE_URI=backend_store_uri,
        MLFLOW_ARTIFACTS_DESTINATION=str(Path(artifacts_dir).absolute()),
        MLFLOW_HOST=LOCALHOST,
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS=str(workers),
    )
    argv = ["bash", str(MLFLOW_SERVER_SCRIPT)]
    return start_http_server(
        argv, f"http://{LOCALHOST}:{port}", log_file, health_path="/health", env=env, timeout=timeout
    )


# ----------------------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin_dir() -> Path | None:
    """The newest `/usr/lib/postgresql/<version>/bin` with initdb and pg_ctl (Debian layout), else PATH's.

    `MEDMTL_PG_BIN` overrides the search.

    Returns:
        The folder, or None when PostgreSQL's server binaries are not installed.
    """
    candidates = [os.environ["MEDMTL_PG_BIN"]] if os.environ.get("MEDMTL_PG_BIN") else []
    debian = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    candidates += [
        str(Path(p).parent) for p in sorted(debian, key=lambda p: _version(Path(p).parts[-3]))[::-1]
    ]
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for folder in candidates:
        if all(os.access(Path(folder, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def postgres_skip_reason() -> str | None:
    """Why a PostgreSQL cluster cannot be started here, or None when it can.

    Returns:
        None, or a sentence naming what is missing (for `pytest.skip`).
    """
    if postgres_bin_dir() is None:
        return (
            "PostgreSQL server binaries (initdb, pg_ctl) not found; scripts/setup.sh installs Debian's "
            "postgresql (MEDMTL_PG_BIN names another folder)"
        )
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: root runs it as the postgres system user
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            return f"running as root and there is no {PG_OS_USER!r} system user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and `runuser` is missing, so PostgreSQL cannot be run as another user"
    try:
        import psycopg2  # noqa: F401  (MLflow's SQLAlchemy store needs a driver)
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[team]')"
    return None


@dataclass
class PostgresCluster:
    """A running throw-away PostgreSQL cluster on 127.0.0.1 (trust authentication, no durability)."""

    root: Path  # data/, the unix socket and postgres.log; removed by stop()
    port: int
    bin_dir: Path
    run_as: list[str] = field(default_factory=list)  # command prefix that runs a server tool as its owner

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        """The server log."""
        return self.root / "postgres.log"

    def uri(self, database: str, driver: str | None = "psycopg2") -> str:
        """A SQLAlchemy URL of one database, as MLflow's `--backend-store-uri` takes it.

        Args:
            database: database name.
            driver: SQLAlchemy driver; SQLAlchemy 2.1 picks psycopg 3 for a bare `postgresql://`, so name the
                installed one. None gives the bare URL a person would write.

        Returns:
            `postgresql+<driver>://postgres@127.0.0.1:<port>/<database>`.
        """
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{PG_SUPERUSER}@{LOCALHOST}:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        """Create a database owned by the superuser.

        Args:
            name: database name.
        """
        _run(
            [str(self.bin_dir / "createdb"), "-h", LOCALHOST, "-p", str(self.port), "-U", PG_SUPERUSER, name]
        )

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server log ("" if unreadable)."""
        return _tail(self.log_file, chars)

    def stop(self) -> None:
        """Stop the server and delete its files. Safe to call twice."""
        if self.data_dir.is_dir():
            pg_ctl = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir)]
            stop = [*self.run_as, *pg_ctl, "-m", "immediate", "-w", "-t", "30", "stop"]
            subprocess.run(stop, capture_output=True, cwd=self.root, env=_pg_env(), timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pg_env() -> dict[str, str]:
    # The caller's PG* variables (PGHOST, PGDATA, ...) would redirect the tools; C locale needs no setup.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _run(argv: Sequence[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, env=_pg_env(), timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )


def start_postgres(databases: Iterable[str] = ("mlflow",), attempts: int = 3) -> PostgresCluster:
    """Create and start a PostgreSQL cluster in a new temporary folder, listening on 127.0.0.1 only.

    As root, the cluster belongs to the `postgres` system user and its tools run through `runuser`
    (PostgreSQL refuses root); otherwise it runs as the current user. The folder is made with `mkdtemp` in
    the system temp folder, not under pytest's tmp_path: the postgres user must be able to reach it, and unix
    socket paths are limited to about 100 characters. fsync is off: a test cluster needs no durability.

    Args:
        databases: databases to create (owned by the `postgres` database superuser, trust authentication).
        attempts: ports tried when the chosen one is taken meanwhile.

    Returns:
        The running cluster; call `stop()` to stop it and delete its folder.

    Raises:
        RuntimeError: `postgres_skip_reason()` is not None, or initdb / pg_ctl / createdb failed (the message
            quotes their output and the server log).
    """
    reason = postgres_skip_reason()
    if reason:
        raise RuntimeError(reason)
    bin_dir = postgres_bin_dir()
    assert bin_dir is not None
    root = Path(tempfile.mkdtemp(prefix="medmtl-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam(PG_OS_USER)
        os.chown(root, owner.pw_uid, owner.pw_gid)
        run_as = ["runuser", "-u", PG_OS_USER, "--"]
    cluster = PostgresCluster(root=root, port=0, bin_dir=bin_dir, run_as=run_as)
    try:
        _run(
            [*run_as, str(bin_dir / "initdb"), "-D", str(cluster.data_dir), "-U", PG_SUPERUSER, "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            cwd=root,
        )  # fmt: skip
        for attempt in range(attempts):
            cluster.port = free_port()
            options = (
                f"-c listen_addresses={LOCALHOST} -p {cluster.port} -c unix_socket_directories={root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(cluster.data_dir), "-l", str(cluster.log_file)]
            start = [*run_as, *pg_ctl, "-o", options, "-w", "-t", "60", "start"]
            proc = subprocess.run(start, capture_output=True, text=True, cwd=root, env=_pg_env(), timeout=120)
            if proc.returncode == 0:
                break
            if attempt == attempts - 1:
                raise RuntimeError(
                    f"pg_ctl start failed ({proc.returncode}):\n{proc.stderr}\n{cluster.log_tail()}"
                )
        for name in databases:
            cluster.create_database(name)
    except BaseException:
        cluster.stop()
        raise
    return cluster
