#!/usr/bin/env bash
# Create a Dataproc cluster for laion-spark (runs gcloud; --dry-run prints the command instead).
#
#   deploy/dataproc/create-cluster.sh --prefix gs://YOUR-BUCKET/laion-spark --region europe-west4
#       [--name laion-spark] [--image 2.2|4.0] [--workers 4] [--worker-type n2-standard-16]
#       [--gpu nvidia-l4] [--gpu-count 1] [--gpu-worker-type g2-standard-8] [--dry-run]
#
# Images: 2.2 (Spark 3.5, Python 3.11) and 4.0 (Spark 4.2, Java 25, Python 3.13).
# --gpu puts that accelerator on every worker and adds Dataproc's GPU driver init action first.
set -euo pipefail
die() { echo "laion-spark dataproc: $*" >&2; exit 1; }

prefix="" region="" name=laion-spark image=2.2 workers=4 worker_type=n2-standard-16
gpu="" gpu_count=1 gpu_worker_type=g2-standard-8 dry_run=no
version=$(sed -n 's/^version *= *//p' "$(dirname "${BASH_SOURCE[0]}")/../../setup.cfg")
while (($#)); do
  case $1 in
    --prefix) prefix=${2%/}; shift 2 ;;
    --region) region=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --image) image=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --worker-type) worker_type=$2; shift 2 ;;
    --gpu) gpu=$2; shift 2 ;;
    --gpu-count) gpu_count=$2; shift 2 ;;
    --gpu-worker-type) gpu_worker_type=$2; shift 2 ;;
    --dry-run) dry_run=yes; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ $prefix == gs://* ]] || die "--prefix gs://YOUR-BUCKET/laion-spark (where upload.sh put the files)"
[[ -n $region ]] || die "--region is required (e.g. europe-west4)"
case $image in 2.2|4.0) ;; *) die "--image takes 2.2 or 4.0 (got '$image')" ;; esac

init_actions=$prefix/deploy/dataproc/init-action.sh
if [[ -n $gpu ]]; then
  init_actions="gs://goog-dataproc-initialization-actions-$region/gpu/install_gpu_driver.sh,$init_actions"
  worker_type=$gpu_worker_type
fi
# spark.pyspark.python: executors must run the Python the init action installed into, or they
# fail with ModuleNotFoundError. Delta's extension makes lake.backend auto pick delta-spark.
properties=(
  "spark:spark.pyspark.python=/opt/conda/default/bin/python"
  "spark:spark.pyspark.driver.python=/opt/conda/default/bin/python"
  "spark:spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension"
  "spark:spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog"
  "spark:spark.sql.execution.arrow.pyspark.enabled=true"
  "spark:spark.sql.parquet.outputTimestampType=TIMESTAMP_MICROS"
  "spark:spark.driver.maxResultSize=4g"
  "spark:spark.executor.memoryOverhead=3g"
  "spark:spark.executor.resource.gpu.discoveryScript=/opt/laion-spark/bin/getGpusResources.sh"
)
cmd=(gcloud dataproc clusters create "$name" --region "$region" --image-version "$image"
  --optional-components DELTA --num-workers "$workers" --worker-machine-type "$worker_type"
  --initialization-actions "$init_actions" --initialization-action-timeout 30m
  --properties "$(IFS=,; echo "${properties[*]}")")
metadata=laion-spark-wheel=$prefix/dist/laion_spark-$version-py3-none-any.whl
if [[ -n $gpu ]]; then
  cmd+=(--worker-accelerator "type=$gpu,count=$gpu_count")
  metadata+=,gpu-driver-provider=NVIDIA
fi
cmd+=(--metadata "$metadata")
if [[ $dry_run == yes ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  "${cmd[@]}"
fi
