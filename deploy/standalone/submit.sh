#!/usr/bin/env bash
# spark-submit one laion-spark stage to the standalone cluster that start-cluster.sh started.
#
#   deploy/standalone/submit.sh [--state-dir ./spark-standalone] [--python python3]
#       [--executor-memory 1g] [--driver-memory 1g] [--jobs-dir <repo>/jobs] [--conf k=v]...
#       STAGE [--config conf/my.yaml] [--set section.key=value]...
#
# STAGE is extract, download, score or index; what follows it goes to jobs/<stage>.py.
# Prints the wall time of the whole submission (JVM start, executors, the stage) at the end.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

state_dir=${LAION_SPARK_STANDALONE_DIR:-./spark-standalone} python=""
executor_memory=1g driver_memory=1g jobs_dir=$here/../../jobs
confs=()
while (($#)); do
  case $1 in
    --state-dir) state_dir=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --executor-memory) executor_memory=$2; shift 2 ;;
    --driver-memory) driver_memory=$2; shift 2 ;;
    --jobs-dir) jobs_dir=$2; shift 2 ;;
    --conf) confs+=(--conf "$2"); shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    -*) die "unknown argument: $1" ;;
    *) break ;;
  esac
done
(($#)) || die "name a stage: extract, download, score or index"
stage=$1
shift
case $stage in
  extract|download|score) job=$jobs_dir/$stage.py ;;
  index) job=$jobs_dir/build_index.py ;;
  *) die "unknown stage '$stage' (extract, download, score or index)" ;;
esac
[[ -f $job ]] || die "no $job (pass --jobs-dir)"
[[ -f $state_dir/master.url ]] || die "no $state_dir/master.url: run start-cluster.sh first"
master_url=$(cat "$state_dir/master.url")
host=${master_url#spark://}
host=${host%:*}

python=$(resolve_python "$python")
spark_home=$(resolve_spark_home "$python")
# The driver binds where the master does (127.0.0.1 by default), so nothing listens on eth0.
export SPARK_LOCAL_IP=$host PYSPARK_PYTHON=$python PYSPARK_DRIVER_PYTHON=$python

started=$(date +%s.%N)
rc=0
"$spark_home/bin/spark-submit" --master "$master_url" --deploy-mode client \
  --driver-memory "$driver_memory" --executor-memory "$executor_memory" \
  --conf "spark.pyspark.python=$python" --conf "spark.pyspark.driver.python=$python" \
  --conf "spark.driver.host=$host" --conf "spark.driver.bindAddress=$host" \
  ${confs[@]+"${confs[@]}"} "$job" "$@" || rc=$?
elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
echo "laion-spark standalone: $stage exited $rc after ${elapsed}s" >&2
exit "$rc"
