#!/usr/bin/env bash
# Build the laion-spark wheel and copy what a Dataproc cluster needs to GCS, in the repo's layout:
#   PREFIX/dist/<wheel>  PREFIX/jobs/*.py  PREFIX/conf/dataproc.yaml  PREFIX/deploy/dataproc/init-action.sh
#
#   deploy/dataproc/upload.sh gs://YOUR-BUCKET/laion-spark [--python python3]
set -euo pipefail
die() { echo "laion-spark upload: $*" >&2; exit 1; }

prefix="" python=python3
while (($#)); do
  case $1 in
    --python) python=$2; shift 2 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    -*) die "unknown argument: $1" ;;
    *) prefix=${1%/}; shift ;;
  esac
done
[[ $prefix == gs://* ]] || die "first argument: the GCS prefix, e.g. gs://YOUR-BUCKET/laion-spark"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
grep -q YOUR-BUCKET conf/dataproc.yaml && echo "warning: conf/dataproc.yaml still names YOUR-BUCKET" >&2

dist=$(mktemp -d)
trap 'rm -rf "$dist"' EXIT
"$python" -m pip wheel -q --no-deps -w "$dist" . || die "wheel build failed"
wheels=("$dist"/laion_spark-*.whl)
[[ -f ${wheels[0]} ]] || die "no wheel built in $dist"
gcloud storage cp "${wheels[0]}" "$prefix/dist/"
gcloud storage cp jobs/*.py "$prefix/jobs/"
gcloud storage cp conf/dataproc.yaml "$prefix/conf/dataproc.yaml"
gcloud storage cp deploy/dataproc/init-action.sh "$prefix/deploy/dataproc/init-action.sh"
echo "uploaded $(basename "${wheels[0]}"), jobs/, conf/dataproc.yaml, deploy/dataproc/init-action.sh to $prefix"
