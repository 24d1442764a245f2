#!/usr/bin/env bash
# Stop the workers and the master that start-cluster.sh started (by the PIDs it recorded).
#
#   deploy/standalone/stop-cluster.sh [--state-dir ./spark-standalone]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

state_dir=${LAION_SPARK_STANDALONE_DIR:-./spark-standalone}
while (($#)); do
  case $1 in
    --state-dir) state_dir=$2; shift 2 ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ -d $state_dir ]] || die "no cluster state in $state_dir"

stop_pid_file() {
  local pid_file=$1 pid waited=0
  pid=$(read_pid "$pid_file")
  if is_spark_daemon "$pid"; then
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null && ((waited < 150)); do
      sleep 0.1
      waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "pid $pid ignored SIGTERM for 15s, sending SIGKILL" >&2
      kill -9 "$pid" 2>/dev/null || true  # it may exit between the check and the kill
    fi
    echo "stopped $(basename "$pid_file" .pid) (pid $pid)" >&2
  fi
  rm -f "$pid_file"
}

shopt -s nullglob
for pid_file in "$state_dir"/worker-*.pid; do
  stop_pid_file "$pid_file"
done
stop_pid_file "$state_dir/master.pid"

# An executor outlives a worker killed with SIGKILL only briefly (it watches its worker); any one
# still running from this cluster's work folder is stopped too.
work=$(cd "$state_dir" && pwd)/work
for proc in /proc/[0-9]*; do
  cwd=$(readlink "$proc/cwd" 2>/dev/null) || continue
  [[ $cwd == "$work"/* ]] || continue
  if tr '\0' ' ' <"$proc/cmdline" 2>/dev/null | grep -q CoarseGrainedExecutorBackend; then
    echo "stopping executor left by a dead worker (pid ${proc#/proc/})" >&2
    kill -9 "${proc#/proc/}" 2>/dev/null || echo "pid ${proc#/proc/} already gone" >&2
  fi
done
