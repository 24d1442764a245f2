#!/usr/bin/env bash
# Build the laion-spark wheel and copy what an EMR cluster needs to S3, in the repo's layout:
#   PREFIX/dist/<wheel>  PREFIX/jobs/*.py  PREFIX/conf/emr.yaml  PREFIX/deploy/emr/bootstrap.sh
#
#   deploy/emr/upload.sh s3://YOUR-BUCKET/laion-spark [--python python3]
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
[[ $prefix == s3://* ]] || die "first argument: the S3 prefix, e.g. s3://YOUR-BUCKET/laion-spark"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
grep -q YOUR-BUCKET conf/emr.yaml && echo "warning: conf/emr.yaml still names YOUR-BUCKET" >&2

dist=$(mktemp -d)
trap 'rm -rf "$dist"' EXIT
"$python" -m pip wheel -q --no-deps -w "$dist" . || die "wheel build failed"
wheels=("$dist"/laion_spark-*.whl)
[[ -f ${wheels[0]} ]] || die "no wheel built in $dist"
aws s3 cp --only-show-errors "${wheels[0]}" "$prefix/dist/"
aws s3 cp --only-show-errors --recursive --exclude '*' --include '*.py' jobs "$prefix/jobs/"
aws s3 cp --only-show-errors conf/emr.yaml "$prefix/conf/emr.yaml"
aws s3 cp --only-show-errors deploy/emr/bootstrap.sh "$prefix/deploy/emr/bootstrap.sh"
echo "uploaded $(basename "${wheels[0]}"), jobs/, conf/emr.yaml, deploy/emr/bootstrap.sh to $prefix"
