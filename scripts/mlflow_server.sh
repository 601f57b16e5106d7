#!/usr/bin/env bash
# Start the team's MLflow tracking server: runs, params and metrics in PostgreSQL, artifacts in a folder (or
# bucket) that the server itself serves, so clients upload and download through HTTP and need no access to it.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.example.org:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=/srv/mlflow/artifacts \
#   scripts/mlflow_server.sh [any `mlflow server` option, e.g. --host 0.0.0.0 --allowed-hosts mlflow.example.org]
#
# Defaults: 127.0.0.1, port 5000, 2 workers (MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS change them; options
# given on the command line win). MLflow's background job runner is off: medmtl does not use it.
# Keep the database password out of the URI (it would show in shell history): put it in the ~/.pgpass of the
# user running the server (`host:port:database:user:password`, chmod 600); psycopg2 reads it from there.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$here/.venv/bin/python}
[ -x "$PY" ] || PY=python3

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://USER@HOST:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. /srv/mlflow/artifacts}"

# SQLAlchemy 2.1 reads a bare postgresql:// as the psycopg 3 driver; medmtl's `team` extra installs psycopg2.
case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql://* | postgres://*)
    MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://${MLFLOW_BACKEND_STORE_URI#*://}" ;;
esac
case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql+psycopg2://*)
    "$PY" -c 'import psycopg2' 2>/dev/null || {
      echo "mlflow_server.sh: psycopg2 is missing; install it with: pip install -e '.[team]'" >&2
      exit 2
    } ;;
esac

# Read by `mlflow server` itself (click envvars), so the URI is not in the process list.
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec "$PY" -m mlflow server --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}" "$@"
