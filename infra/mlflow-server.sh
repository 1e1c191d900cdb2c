#!/usr/bin/env bash
# An MLflow tracking server the pipeline's driver and Ray workers can all reach.
#   infra/mlflow-server.sh [PORT]          (env: MLFLOW_BACKEND_STORE, MLFLOW_ARTIFACTS, MLFLOW_HOST)
# Backend: sqlite under ./runs by default; use postgresql://... for a shared server.
# Artifacts are proxied by the server (mlflow-artifacts:/), so clients need no storage credentials.
# Stop it with: kill -- -<pid> (it runs in its own process group).
set -euo pipefail
PROJECT="$(cd "$(dirname "$0")/.." && pwd)"
MLFLOW_BIN="mlflow"
[ -x "$PROJECT/.venv/bin/mlflow" ] && MLFLOW_BIN="$PROJECT/.venv/bin/mlflow"
PORT="${1:-5000}"
HOST="${MLFLOW_HOST:-127.0.0.1}"            # 0.0.0.0 on a cluster, behind your network policy
STORE="${MLFLOW_BACKEND_STORE:-sqlite:///$(pwd)/runs/mlflow-server.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS:-$(pwd)/runs/mlflow-server-artifacts}"
case "$STORE" in sqlite:///*) mkdir -p "$(dirname "${STORE#sqlite:///}")" ;; esac
# The job runner would start 7 idle huey consumers that outlive a plain kill.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true
ALLOWED=()
[ "$HOST" = "127.0.0.1" ] || ALLOWED=(--allowed-hosts "*")
exec "$MLFLOW_BIN" server --backend-store-uri "$STORE" --artifacts-destination "$ARTIFACTS" \
  --host "$HOST" --port "$PORT" --workers 1 "${ALLOWED[@]}"
