#!/usr/bin/env bash
# A second venv with another pyspark (e.g. 3.5 for EMR 7 / Dataproc 2.2), sharing everything else
# (torch, faiss, deltalake ...) with the main venv through a .pth file, so it costs one pyspark
# wheel, not a second torch. Its own site-packages comes first on sys.path, so its pyspark (and
# py4j) shadow the main venv's.
#
#   scripts/setup-spark-venv.sh .venv-spark35 'pyspark==3.5.9' [.venv]
#
# Idempotent: a stamp holds the pyspark spec and the main venv's path; same inputs, no work.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$1
SPEC=$2
MAIN=${3:-.venv}
MAIN_SITE=$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
STAMP="$VENV/.installed"
WANT="$SPEC $MAIN_SITE addsitedir"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
echo "setup: $VENV with $SPEC (rest shared with $MAIN)"
PY=$(readlink -f "$MAIN/bin/python")
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a bare path) so the main venv's own .pth files run too: its editable install
# of laion_spark among them.
printf 'import site; site.addsitedir(%s)\n' "'$MAIN_SITE'" >"$SITE/zz-laion-main-venv.pth"
# --no-deps + py4j by hand: pip would otherwise see the main venv's pyspark through the .pth.
"$VENV/bin/python" -m pip install -q --no-deps --ignore-installed "$SPEC"
REQ=$("$VENV/bin/python" - <<'EOF'
from importlib.metadata import distribution
dist = distribution("pyspark")  # this venv's own site-packages comes first
print(next(r.split(";")[0].replace(" ", "") for r in (dist.requires or []) if r.startswith("py4j")))
EOF
)
"$VENV/bin/python" -m pip install -q --no-deps --ignore-installed "$REQ"
"$VENV/bin/python" -c 'import pyspark, py4j, sys; print("setup:", sys.prefix, "pyspark", pyspark.__version__)'
printf '%s' "$WANT" >"$STAMP"
