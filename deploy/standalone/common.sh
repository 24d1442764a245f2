# shellcheck shell=bash
# Shared by start-cluster.sh, submit.sh and stop-cluster.sh (sourced, never run).
# Resolves the Python every Spark process uses, SPARK_HOME and the cluster's state folder.

die() { echo "laion-spark standalone: $*" >&2; exit 1; }

# The Python that has laion-spark installed: the driver and every executor run it
# (spark.pyspark.python); without it executors fail with ModuleNotFoundError.
resolve_python() {
  local py=${1:-${PYSPARK_PYTHON:-python3}}
  command -v "$py" >/dev/null 2>&1 || die "python '$py' not found (pass --python or set PYSPARK_PYTHON)"
  command -v "$py"
}

# SPARK_HOME: as given, else the pip-installed pyspark of that Python (it ships bin/spark-class
# and bin/spark-submit, but no sbin/start-master.sh).
resolve_spark_home() {
  local py=$1
  if [[ -n ${SPARK_HOME:-} ]]; then
    echo "$SPARK_HOME"
    return
  fi
  "$py" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))' 2>/dev/null \
    || die "no SPARK_HOME and '$py' cannot import pyspark (pip install 'laion-spark[spark]' or set SPARK_HOME)"
}

# True when PID is alive and is one of the Spark daemons this folder started.
is_spark_daemon() {
  local pid=$1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'org.apache.spark.deploy.'
}

read_pid() {
  if [[ -f $1 ]]; then cat "$1"; fi
}

# Wait until FILE contains PATTERN; fail early if PID died, or after TIMEOUT seconds.
wait_for_log() {
  local file=$1 pattern=$2 pid=$3 timeout=$4 waited=0
  until grep -q "$pattern" "$file" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || die "process $pid exited before '$pattern'; see $file"
    ((waited < timeout * 10)) || die "no '$pattern' in $file after ${timeout}s"
    sleep 0.1
    waited=$((waited + 1))
  done
}
