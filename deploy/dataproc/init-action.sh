#!/usr/bin/env bash
# Dataproc initialization action (images 2.2 and 4.0): install laion-spark on every node, CPU or GPU.
# An init action gets no arguments; it reads cluster metadata (create-cluster.sh sets it):
#   laion-spark-wheel          gs://…/laion_spark-0.1.0-py3-none-any.whl (required)
#   laion-spark-extras         wheel extras (default: gcs; GPU nodes add gpu)
#   laion-spark-python         interpreter (default: /opt/conda/default/bin/python, Dataproc's PYSPARK_PYTHON)
#   laion-spark-torch-version  (default: 2.13.0)
#   laion-spark-torch-index-url  pip index for torch on CPU nodes (default: pip's own)
# On GPU workers, list Dataproc's GPU driver init action before this one.
# The wheel is installed WITHOUT pyspark: the image's Spark (/usr/lib/spark) stays the only one.
set -euo pipefail

die() { echo "laion-spark init action: $*" >&2; exit 1; }

# A metadata attribute, or $2 when the cluster has none.
meta() {
  local value
  if value=$(/usr/share/google/get_metadata_value "attributes/$1" 2>/dev/null); then
    echo "$value"
  else
    echo "${2-}"
  fi
}

wheel=$(meta laion-spark-wheel "")
extras=$(meta laion-spark-extras gcs)
python=$(meta laion-spark-python /opt/conda/default/bin/python)
torch_version=$(meta laion-spark-torch-version 2.13.0)
torch_index=$(meta laion-spark-torch-index-url "")
[[ -n $wheel ]] || die "set the cluster metadata laion-spark-wheel=gs://…/laion_spark-<version>-py3-none-any.whl"
[[ -x $python ]] || die "no interpreter at $python (metadata laion-spark-python)"
"$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || die "$python is older than 3.11"

gpu=no
for f in /sys/bus/pci/devices/*/vendor; do
  if [[ -r $f && $(cat "$f") == 0x10de ]]; then gpu=yes; fi
done
if [[ $gpu == yes ]]; then
  command -v nvidia-smi >/dev/null 2>&1 \
    || die "GPU node without nvidia-smi: list the GPU driver init action before this one"
  extras="$extras,gpu"
fi
echo "laion-spark init action: gpu=$gpu python=$python extras=[$extras]"

# A compiler for any dependency without a wheel for this Python (CLD3 comes as cld3-py wheels).
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq g++ >/dev/null

torch_spec=torch${torch_version:+==$torch_version}
if [[ $gpu == no && -n $torch_index ]]; then
  "$python" -m pip install -q "$torch_spec" --index-url "$torch_index"
else
  "$python" -m pip install -q "$torch_spec"
fi
local_wheel=/tmp/$(basename "$wheel")
if [[ $wheel == gs://* ]]; then
  gcloud storage cp "$wheel" "$local_wheel"
else
  local_wheel=$wheel
fi
[[ -f $local_wheel ]] || die "no wheel at $local_wheel"
"$python" -m pip install -q "${local_wheel}[$extras]"
if "$python" -m pip show -q pyspark >/dev/null 2>&1; then
  die "the wheel pulled pyspark from the package index; build it from a laion-spark whose pyspark is the 'spark' extra"
fi
"$python" -c 'import laion_spark.job, torch' || die "laion_spark does not import with $python"

# GPU discovery script for spark.executor.resource.gpu.discoveryScript (every node: harmless on CPU).
mkdir -p /opt/laion-spark/bin
cat >/opt/laion-spark/bin/getGpusResources.sh <<'SCRIPT'
#!/usr/bin/env bash
# Spark resource discovery: {"name": "gpu", "addresses": ["0", "1", ...]} from nvidia-smi.
set -euo pipefail
ids=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e 's/ //g' -e 's/.*/"&"/' | paste -sd, -)
echo "{\"name\": \"gpu\", \"addresses\": [${ids}]}"
SCRIPT
chmod 755 /opt/laion-spark/bin/getGpusResources.sh
if [[ $gpu == yes ]]; then
  /opt/laion-spark/bin/getGpusResources.sh
fi
echo "laion-spark init action: done"
