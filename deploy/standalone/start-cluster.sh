#!/usr/bin/env bash
# Start a Spark standalone master and N workers on this host, from pip's pyspark or SPARK_HOME.
# Re-running it starts only what is not running (e.g. a worker that died).
#
#   deploy/standalone/start-cluster.sh [--workers 2] [--cores 1] [--memory 1g] [--host 127.0.0.1]
#       [--port 7077] [--webui-port 8080] [--state-dir ./spark-standalone] [--python python3]
#
# Prints the master URL (also in STATE_DIR/master.url). Logs and PIDs live in STATE_DIR.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

workers=2 cores=1 memory=1g host=127.0.0.1 port=7077 webui_port=8080
state_dir=${LAION_SPARK_STANDALONE_DIR:-./spark-standalone} python=""
while (($#)); do
  case $1 in
    --workers) workers=$2; shift 2 ;;
    --cores) cores=$2; shift 2 ;;
    --memory) memory=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --webui-port) webui_port=$2; shift 2 ;;
    --state-dir) state_dir=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ $workers =~ ^[0-9]+$ && $cores =~ ^[1-9][0-9]*$ && $port =~ ^[1-9][0-9]*$ ]] \
  || die "--workers, --cores and --port take whole numbers"

python=$(resolve_python "$python")
spark_home=$(resolve_spark_home "$python")
command -v java >/dev/null 2>&1 || [[ -n ${JAVA_HOME:-} ]] || die "no java on PATH and no JAVA_HOME"
mkdir -p "$state_dir/logs" "$state_dir/work"
state_dir=$(cd "$state_dir" && pwd)
export SPARK_HOME=$spark_home SPARK_LOCAL_IP=$host PYSPARK_PYTHON=$python
# Daemons log to STATE_DIR/logs, not to the pyspark package folder.
export SPARK_LOG_DIR=$state_dir/logs SPARK_WORKER_DIR=$state_dir/work

master_url="spark://$host:$port"
master_pid=$(read_pid "$state_dir/master.pid")
if is_spark_daemon "$master_pid"; then
  echo "master already running (pid $master_pid) at $(cat "$state_dir/master.url")" >&2
  master_url=$(cat "$state_dir/master.url")
else
  log=$state_dir/logs/master.log
  : >"$log"
  nohup "$spark_home/bin/spark-class" org.apache.spark.deploy.master.Master \
    --host "$host" --port "$port" --webui-port "$webui_port" >"$log" 2>&1 </dev/null &
  master_pid=$!
  echo "$master_pid" >"$state_dir/master.pid"
  wait_for_log "$log" "Starting Spark master at" "$master_pid" 120
  echo "$master_url" >"$state_dir/master.url"
  echo "master started (pid $master_pid) at $master_url" >&2
fi

# Launch every missing worker first, then wait for each: their JVMs start side by side.
started=()
for ((i = 1; i <= workers; i++)); do
  pid_file=$state_dir/worker-$i.pid
  pid=$(read_pid "$pid_file")
  if is_spark_daemon "$pid"; then
    echo "worker $i already running (pid $pid)" >&2
    continue
  fi
  log=$state_dir/logs/worker-$i.log
  : >"$log"
  mkdir -p "$state_dir/work/worker-$i"
  # --webui-port 0: any free port, so N workers share one host.
  nohup "$spark_home/bin/spark-class" org.apache.spark.deploy.worker.Worker \
    --host "$host" --cores "$cores" --memory "$memory" --webui-port 0 \
    --work-dir "$state_dir/work/worker-$i" "$master_url" >"$log" 2>&1 </dev/null &
  echo "$!" >"$pid_file"
  started+=("$i")
done
for i in ${started[@]+"${started[@]}"}; do
  pid=$(read_pid "$state_dir/worker-$i.pid")
  wait_for_log "$state_dir/logs/worker-$i.log" "Successfully registered with master" "$pid" 120
  echo "worker $i started (pid $pid, $cores cores, $memory)" >&2
done
echo "$master_url"
