#!/usr/bin/env bash
# Submit one laion-spark stage to a Dataproc cluster (runs gcloud; --dry-run prints the command).
#
#   deploy/dataproc/submit.sh --prefix gs://YOUR-BUCKET/laion-spark --region europe-west4
#       [--cluster laion-spark] [--dry-run] STAGE [--set section.key=value]...
#
# Cluster deploy mode: YARN copies conf/dataproc.yaml (--files) into the driver's working folder,
# so the job reads it by its base name. The score stage asks for one GPU per executor and task.
set -euo pipefail
die() { echo "laion-spark dataproc: $*" >&2; exit 1; }

prefix="" region="" cluster=laion-spark dry_run=no
while (($#)); do
  case $1 in
    --prefix) prefix=${2%/}; shift 2 ;;
    --region) region=$2; shift 2 ;;
    --cluster) cluster=$2; shift 2 ;;
    --dry-run) dry_run=yes; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    -*) die "unknown argument: $1" ;;
    *) break ;;
  esac
done
[[ $prefix == gs://* ]] || die "--prefix gs://YOUR-BUCKET/laion-spark"
[[ -n $region ]] || die "--region is required"
(($#)) || die "name a stage: extract, download, score or index"
stage=$1
shift
properties=spark.submit.deployMode=cluster
case $stage in
  extract|download) job=$stage.py; properties+=,spark.executor.pyspark.memory=2g ;;
  score) job=score.py
    properties+=,spark.executor.resource.gpu.amount=1,spark.task.resource.gpu.amount=1
    properties+=,spark.executor.memoryOverhead=12g ;;
  index) job=build_index.py; properties+=,spark.driver.memory=4g,spark.driver.memoryOverhead=40g ;;
  *) die "unknown stage '$stage' (extract, download, score or index)" ;;
esac
cmd=(gcloud dataproc jobs submit pyspark "$prefix/jobs/$job" --cluster "$cluster" --region "$region"
  --files "$prefix/conf/dataproc.yaml" --properties "$properties" -- --config dataproc.yaml "$@")
if [[ $dry_run == yes ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  "${cmd[@]}"
fi
