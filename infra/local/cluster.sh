#!/usr/bin/env bash
# A local "cluster" for `crossmodal submit` / `crossmodal jobs`: a Ray head with its dashboard
# (job submission) and an MLflow tracking server, both on 127.0.0.1.
#   infra/local/cluster.sh up|down|status          (make cluster-up / make cluster-down)
# Each server runs under setsid in its own process group; the group ids, logs and the MLflow
# store live in $CLUSTER_DIR. `down` stops only those groups (and what they spawned): never
# `ray stop`, which would stop every Ray instance on the machine.
# env: CLUSTER_DIR (runs/cluster), RAY_DASHBOARD_PORT (8265), MLFLOW_PORT (5001),
#      RAY_NUM_CPUS (4), RAY_OBJECT_STORE_MB (1536), CLUSTER_WAIT_S (180), CLUSTER_STOP_S (10),
#      CROSSMODAL_BIN (the venv's bin folder: .venv/bin, else the one on PATH)
set -euo pipefail
PROJECT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="$(realpath -m "${CLUSTER_DIR:-$PROJECT/runs/cluster}")"
BIN="${CROSSMODAL_BIN:-$PROJECT/.venv/bin}"
[ -x "$BIN/ray" ] || BIN="$(dirname "$(command -v ray || echo /nonexistent/ray)")"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5001}"
NUM_CPUS="${RAY_NUM_CPUS:-4}"   # Ray Data and the train workers each reserve CPUs: 2 logical ones hang
OBJECT_STORE_MB="${RAY_OBJECT_STORE_MB:-1536}"
WAIT_S="${CLUSTER_WAIT_S:-180}"
# `ray start --block` answers SIGTERM by draining its node through the GCS, which the same
# signal has just stopped: it waits out a long timeout, so SIGKILL follows after this many s.
STOP_S="${CLUSTER_STOP_S:-10}"
SERVERS=(ray mlflow)

die() { echo "cluster.sh: error: $*" >&2; exit 1; }

# A process group is alive while a process in it is not a zombie (those wait for init to reap
# them, and kill -0 would still count them).
group_alive() { ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'; }

pgid_of() { [ -f "$DIR/$1.pgid" ] && cat "$DIR/$1.pgid" || true; }

# A pid file can outlive its group and the id be reused: a group is ours only while one of its
# processes runs in $DIR (both servers start there and their children inherit it).
group_ours() {
  local p
  for p in $(ps -eo pid=,pgid= | awk -v g="$1" '$2 == g { print $1 }'); do
    [ "$(readlink "/proc/$p/cwd" 2>/dev/null)" = "$DIR" ] && return 0
  done
  return 1
}

server_up() { local g; g="$(pgid_of "$1")"; [ -n "$g" ] && group_alive "$g" && group_ours "$g"; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

answers() { curl -fsS --max-time 2 "$1" >/dev/null 2>&1; }

free_ports() {  # N distinct ports free now; the head's internal ports, which nobody needs to know
  "$BIN/python" -c 'import socket,sys
socks=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

start_ray() {
  local gcs client agent agent_grpc metrics runtime_env
  read -r gcs client agent agent_grpc metrics runtime_env <<<"$(free_ports 6)"
  # PATH: the job's entrypoint (`python -m pipelines ...`) must find the project's Python.
  # Token auth off: the cluster is private to this machine and the CLI does not carry a token.
  (cd "$DIR" && PATH="$BIN:$PATH" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \
    exec setsid "$BIN/ray" start --head --block --node-ip-address=127.0.0.1 --port="$gcs" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --ray-client-server-port="$client" --dashboard-agent-listen-port="$agent" \
      --dashboard-agent-grpc-port="$agent_grpc" --metrics-export-port="$metrics" \
      --runtime-env-agent-port="$runtime_env" --num-cpus="$NUM_CPUS" \
      --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) --disable-usage-stats \
      >"$DIR/ray.log" 2>&1 </dev/null) &
  echo $! >"$DIR/ray.pgid"   # setsid without a fork: the pid leads the new group
  echo "$gcs" >"$DIR/ray.gcs_port"
}

start_mlflow() {
  # The job runner would start 7 idle huey consumers; artifacts are served by the server.
  (cd "$DIR" && MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
    exec setsid "$BIN/mlflow" server --backend-store-uri "sqlite:///$DIR/mlflow.db" \
      --serve-artifacts --artifacts-destination "$DIR/artifacts" \
      --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      >"$DIR/mlflow.log" 2>&1 </dev/null) &
  echo $! >"$DIR/mlflow.pgid"
}

wait_until_answering() {
  local deadline=$((SECONDS + WAIT_S)) ray_ok="" mlflow_ok=""
  while [ $SECONDS -lt $deadline ]; do
    # The dashboard answers before the node has started (and when it then fails to): the
    # head is up once `ray start` says so.
    [ -n "$ray_ok" ] || { grep -q "Ray runtime started" "$DIR/ray.log" &&
      answers "http://127.0.0.1:$DASHBOARD_PORT/api/version" && ray_ok=1; }
    [ -n "$mlflow_ok" ] || { answers "http://127.0.0.1:$MLFLOW_PORT/health" && mlflow_ok=1; }
    [ -n "$ray_ok" ] && [ -n "$mlflow_ok" ] && return 0
    for server in "${SERVERS[@]}"; do
      kill -0 "$(pgid_of "$server")" 2>/dev/null || { tail -n 20 "$DIR/$server.log" >&2; echo "$server exited" >&2; return 1; }
    done
    sleep 1
  done
  echo "not answering after ${WAIT_S} s (logs in $DIR)" >&2
  return 1
}

# Every process of the group and, walking parent links, all they spawned: Ray puts each worker
# and each job's driver in a group of its own, so the head's group alone is not all of it.
groups_of_tree() {
  ps -eo pid=,ppid=,pgid= | awk -v root="$1" '
    { pid[NR]=$1; ppid[NR]=$2; pg[NR]=$3; if ($3 == root) mine[$1]=1 }
    END {
      do { grew=0; for (i=1; i<=NR; i++) if (!(pid[i] in mine) && (ppid[i] in mine)) { mine[pid[i]]=1; grew=1 } } while (grew)
      for (i=1; i<=NR; i++) if (pid[i] in mine) groups[pg[i]]=1
      for (g in groups) print g
    }'
}

stop_groups() {  # SIGTERM the groups, SIGKILL what is left after STOP_S
  local groups=("$@") deadline=$((SECONDS + STOP_S)) alive
  for g in "${groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  while :; do
    alive=()
    for g in "${groups[@]}"; do group_alive "$g" && alive+=("$g"); done
    [ ${#alive[@]} -eq 0 ] && return 0
    [ $SECONDS -ge $deadline ] && break
    sleep 0.5
  done
  for g in "${alive[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
  for _ in $(seq 20); do
    alive=()
    for g in "${groups[@]}"; do group_alive "$g" && alive+=("$g"); done
    [ ${#alive[@]} -eq 0 ] && return 0
    sleep 0.25
  done
  echo "process groups still alive: ${alive[*]}" >&2
  return 1
}

cmd_down() {  # both servers at once: the Ray head alone takes STOP_S
  local pgid all=() groups names=()
  for server in "${SERVERS[@]}"; do
    pgid="$(pgid_of "$server")"
    [ -n "$pgid" ] || continue
    names+=("$server")
    server_up "$server" || continue
    mapfile -t groups < <(groups_of_tree "$pgid")
    all+=("$pgid" "${groups[@]}")
  done
  if [ ${#names[@]} -eq 0 ]; then
    echo "cluster.sh: not up (no pid files in $DIR)"
    return 0
  fi
  if [ ${#all[@]} -gt 0 ]; then
    mapfile -t all < <(printf '%s\n' "${all[@]}" | sort -un)
    stop_groups "${all[@]}" || return 1
  fi
  for server in "${names[@]}"; do rm -f "$DIR/$server.pgid"; done
  rm -f "$DIR/ray.gcs_port" "$DIR/env"
  echo "stopped ${names[*]} (process groups ${all[*]:-none alive})"
}

cmd_up() {
  for server in "${SERVERS[@]}"; do
    pgid="$(pgid_of "$server")"
    if server_up "$server"; then
      die "already up ($server is process group $pgid; pid files in $DIR): make cluster-down first"
    fi
  done
  [ -x "$BIN/ray" ] && [ -x "$BIN/mlflow" ] || die "ray and mlflow not found in $BIN (run make setup)"
  listening "$DASHBOARD_PORT" && die "port $DASHBOARD_PORT is in use: set RAY_DASHBOARD_PORT to a free one"
  listening "$MLFLOW_PORT" && die "port $MLFLOW_PORT is in use: set MLFLOW_PORT to a free one"
  mkdir -p "$DIR"
  rm -f "$DIR"/*.pgid
  start_ray
  start_mlflow
  if ! wait_until_answering; then
    cmd_down >/dev/null || true
    die "the local cluster did not come up (logs in $DIR)"
  fi
  printf 'export RAY_ADDRESS=http://127.0.0.1:%s\nexport MLFLOW_TRACKING_URI=http://127.0.0.1:%s\n' \
    "$DASHBOARD_PORT" "$MLFLOW_PORT" >"$DIR/env"
  echo "Ray head: dashboard http://127.0.0.1:$DASHBOARD_PORT, GCS 127.0.0.1:$(cat "$DIR/ray.gcs_port"), $NUM_CPUS CPUs (log $DIR/ray.log)"
  echo "MLflow server: http://127.0.0.1:$MLFLOW_PORT, store $DIR/mlflow.db (log $DIR/mlflow.log)"
  echo "for crossmodal submit / crossmodal jobs, in your shell (or: source $DIR/env):"
  cat "$DIR/env"
  echo "stop both: make cluster-down"
}

cmd_status() {
  local up=0 pgid
  for server in "${SERVERS[@]}"; do
    pgid="$(pgid_of "$server")"
    if server_up "$server"; then
      echo "$server: up (process group $pgid)"
    else
      echo "$server: down"
      up=1
    fi
  done
  [ $up -eq 0 ] && cat "$DIR/env" 2>/dev/null
  return $up
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
