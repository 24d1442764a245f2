#!/usr/bin/env bash
# EMR bootstrap action (EMR 7.x, Amazon Linux 2023): install laion-spark on every node, CPU or GPU.
#
#   Path=s3://YOUR-BUCKET/laion-spark/deploy/emr/bootstrap.sh,
#   Args=[s3://YOUR-BUCKET/laion-spark/dist/laion_spark-0.1.0-py3-none-any.whl]
#
# Optional arguments after the wheel (all have defaults; a bootstrap action gets no environment):
#   --python python3.11     interpreter to install into; must be spark.pyspark.python in configurations.json
#   --extras s3             wheel extras; GPU nodes add "gpu"
#   --gpu auto|yes|no       auto: an NVIDIA PCI device means a GPU node
#   --torch-index-url URL   pip index for torch (e.g. a CPU-only wheel index for CPU nodes; default: pip's own)
#   --torch-version 2.13.0  torch version ("" = latest)
#
# The wheel is installed WITHOUT pyspark: EMR's own Spark (/usr/lib/spark) stays the only one.
set -euo pipefail

die() { echo "laion-spark bootstrap: $*" >&2; exit 1; }

wheel="" python=python3.11 extras=s3 gpu=auto torch_index="" torch_version=2.13.0
while (($#)); do
  case $1 in
    --python) python=$2; shift 2 ;;
    --extras) extras=$2; shift 2 ;;
    --gpu) gpu=$2; shift 2 ;;
    --torch-index-url) torch_index=$2; shift 2 ;;
    --torch-version) torch_version=$2; shift 2 ;;
    -*) die "unknown argument: $1" ;;
    *) [[ -z $wheel ]] || die "one wheel only (got '$wheel' and '$1')"; wheel=$1; shift ;;
  esac
done
[[ -n $wheel ]] || die "first argument: the laion_spark wheel (s3://... or a local path)"
case $gpu in auto|yes|no) ;; *) die "--gpu takes auto, yes or no (got '$gpu')" ;; esac

SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO=sudo

has_nvidia_pci() {
  local f
  for f in /sys/bus/pci/devices/*/vendor; do
    [[ -r $f && $(cat "$f") == 0x10de ]] && return 0
  done
  return 1
}
if [[ $gpu == auto ]]; then
  if has_nvidia_pci; then gpu=yes; else gpu=no; fi
fi
if [[ $gpu == yes ]]; then
  command -v nvidia-smi >/dev/null 2>&1 \
    || die "GPU node without nvidia-smi: use an EMR release whose AMI has the NVIDIA driver (7.x)"
  extras="$extras,gpu"
fi
echo "laion-spark bootstrap: gpu=$gpu python=$python extras=[$extras]"

# System packages: the interpreter, and a compiler for any dependency without a wheel.
pkgs=(gcc-c++)
command -v "$python" >/dev/null 2>&1 || pkgs+=("$python" "$python-devel" "$python-pip")
if command -v dnf >/dev/null 2>&1; then
  $SUDO dnf install -y -q "${pkgs[@]}"
else
  $SUDO yum install -y -q "${pkgs[@]}"
fi
command -v "$python" >/dev/null 2>&1 || die "$python still missing after installing ${pkgs[*]}"
"$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || die "$python is older than 3.11"
"$python" -m pip --version >/dev/null 2>&1 || $SUDO "$python" -m ensurepip --upgrade
$SUDO "$python" -m pip install -q --upgrade pip

# torch first, from the index the node needs (PyPI's Linux build carries CUDA and also runs on CPU;
# a CPU-only index saves about 2 GB per CPU node).
torch_spec=torch${torch_version:+==$torch_version}
if [[ $gpu == no && -n $torch_index ]]; then
  $SUDO "$python" -m pip install -q "$torch_spec" --index-url "$torch_index"
else
  $SUDO "$python" -m pip install -q "$torch_spec"
fi

local_wheel=$wheel
if [[ $wheel == s3://* ]]; then
  local_wheel=/tmp/$(basename "$wheel")
  aws s3 cp --only-show-errors "$wheel" "$local_wheel"
fi
[[ -f $local_wheel ]] || die "no wheel at $local_wheel"
$SUDO "$python" -m pip install -q "${local_wheel}[$extras]"
# EMR's Spark must stay the only one: a pyspark from PyPI beside it mixes versions on the path.
if "$python" -m pip show -q pyspark >/dev/null 2>&1; then
  die "the wheel pulled pyspark from the package index; build it from a laion-spark whose pyspark is the 'spark' extra"
fi
"$python" -c 'import laion_spark.job, torch' || die "laion_spark does not import with $python"

# GPU discovery script for spark.executor.resource.gpu.discoveryScript (every node: harmless on CPU).
$SUDO mkdir -p /opt/laion-spark/bin
$SUDO tee /opt/laion-spark/bin/getGpusResources.sh >/dev/null <<'SCRIPT'
#!/usr/bin/env bash
# Spark resource discovery: {"name": "gpu", "addresses": ["0", "1", ...]} from nvidia-smi.
set -euo pipefail
ids=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e 's/ //g' -e 's/.*/"&"/' | paste -sd, -)
echo "{\"name\": \"gpu\", \"addresses\": [${ids}]}"
SCRIPT
$SUDO chmod 755 /opt/laion-spark/bin/getGpusResources.sh

# YARN GPU isolation on EMR 7 (cgroup v2 hosts): the NodeManager's devices controller lives in a
# cgroup v1 hierarchy under /spark-rapids-cgroup (instance-groups.json names it).
if [[ $gpu == yes ]]; then
  $SUDO mkdir -p /spark-rapids-cgroup/devices
  if ! mountpoint -q /spark-rapids-cgroup/devices; then
    $SUDO mount -t cgroup -o devices cgroupv1-devices /spark-rapids-cgroup/devices
  fi
  $SUDO chmod a+rwx -R /spark-rapids-cgroup
  /opt/laion-spark/bin/getGpusResources.sh
fi
echo "laion-spark bootstrap: done"
