#!/usr/bin/env bash
# Build the laion-spark wheel and copy what a cluster needs to object storage, in the repo's layout:
#   s3://…: PREFIX/dist/<wheel>  PREFIX/jobs/*.py  PREFIX/conf/emr.yaml       PREFIX/deploy/emr/bootstrap.sh
#   gs://…: PREFIX/dist/<wheel>  PREFIX/jobs/*.py  PREFIX/conf/dataproc.yaml  PREFIX/deploy/dataproc/init-action.sh
#
#   deploy/upload.sh s3://YOUR-BUCKET/laion-spark|gs://YOUR-BUCKET/laion-spark [--python python3]
#       [--wheel dist/laion_spark-<version>-py3-none-any.whl]   (default: build it from this checkout)
set -euo pipefail
die() { echo "laion-spark upload: $*" >&2; exit 1; }

prefix="" python=python3 wheel=""
while (($#)); do
  case $1 in
    --python) python=$2; shift 2 ;;
    --wheel) wheel=$2; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    -*) die "unknown argument: $1" ;;
    *) prefix=${1%/}; shift ;;
  esac
done
case $prefix in
  s3://*) files=(conf/emr.yaml deploy/emr/bootstrap.sh); copy() { aws s3 cp --only-show-errors "$@"; } ;;
  gs://*) files=(conf/dataproc.yaml deploy/dataproc/init-action.sh); copy() { gcloud storage cp "$@"; } ;;
  *) die "first argument: the prefix, e.g. s3://YOUR-BUCKET/laion-spark or gs://YOUR-BUCKET/laion-spark" ;;
esac
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
if grep -q YOUR-BUCKET "${files[0]}"; then
  echo "warning: ${files[0]} still names YOUR-BUCKET" >&2
fi

if [[ -z $wheel ]]; then
  # Build from a copy of the package sources: the checkout gets no build/ or egg-info.
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mkdir "$tmp/src"
  cp -r setup.cfg pyproject.toml README.md laion_spark "$tmp/src/"
  isolation=()
  "$python" -c 'import setuptools, wheel' 2>/dev/null && isolation=(--no-build-isolation)
  "$python" -m pip wheel -q --no-deps "${isolation[@]}" -w "$tmp/dist" "$tmp/src" \
    || die "wheel build failed"
  wheels=("$tmp"/dist/laion_spark-*.whl)
  wheel=${wheels[0]}
fi
[[ -f $wheel ]] || die "no wheel at $wheel"
copy "$wheel" "$prefix/dist/$(basename "$wheel")"
for f in jobs/*.py "${files[@]}"; do
  copy "$f" "$prefix/$f"
done
echo "uploaded $(basename "$wheel"), jobs/, ${files[*]} to $prefix"
