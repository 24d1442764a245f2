#!/usr/bin/env bash
# EMR bootstrap action: install laion-spark and its Python dependencies on every node.
# Usage (cluster creation): --bootstrap-actions Path=s3://YOUR-BUCKET/laion-spark/bootstrap.sh,Args=[s3://YOUR-BUCKET/laion-spark/laion_spark-0.1.0-py3-none-any.whl]
set -euo pipefail
WHEEL=${1:?"path of the laion_spark wheel on S3"}
sudo yum install -y -q protobuf-compiler protobuf-devel gcc-c++ python3.11 python3.11-devel || true
PY=$(command -v python3.11 || command -v python3)
sudo "$PY" -m pip install -q --upgrade pip
# CPU executors get the CPU torch build; GPU node groups install the CUDA build instead.
if command -v nvidia-smi >/dev/null 2>&1; then
  sudo "$PY" -m pip install -q torch
  EXTRA="[gpu,s3]"
else
  sudo "$PY" -m pip install -q torch --index-url "${TORCH_CPU_INDEX:?set TORCH_CPU_INDEX to your CPU wheel index}"
  EXTRA="[s3]"
fi
aws s3 cp "$WHEEL" /tmp/
sudo "$PY" -m pip install -q "/tmp/$(basename "$WHEEL")$EXTRA"
