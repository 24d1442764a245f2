#!/usr/bin/env bash
# Fetch Delta Lake's and hadoop-aws's jars for the pyspark installed in a venv, with Maven, into
# .jars/spark-<major.minor>/ (outside git). laion_spark.spark finds them there and puts them on
# spark.jars, so `lake.backend: auto` picks delta-spark locally too.
#
#   scripts/setup-jars.sh .venv/bin/python
#
# Idempotent: the folder carries a stamp of the pom it was made from; an unchanged pom is a no-op.
# Maven keeps its downloads in ~/.m2, so a fresh clone on the same machine copies, not downloads.
# The AWS SDK bundle hadoop-aws needs is large (hundreds of MB): the first run takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}

read -r SPARK SCALA HADOOP < <("$PYTHON" - <<'EOF'
import glob, os, re, pyspark
jars = os.path.join(os.path.dirname(pyspark.__file__), "jars")
def ver(pattern):
    for p in glob.glob(os.path.join(jars, pattern)):
        m = re.search(r"-(\d+\.\d+)(?:\.\d+)*\.jar$", p) if "scala" in pattern else re.search(r"-(\d+\.\d+\.\d+)\.jar$", p)
        if m:
            return m.group(1)
    raise SystemExit(f"no {pattern} in {jars}")
print(pyspark.__version__, ver("scala-library-*.jar"), ver("hadoop-client-api-*.jar"))
EOF
)
SPARK_MM=${SPARK%.*}
# Delta release per Spark minor (the Spark each Delta release's pom builds against):
# DELTA_VERSION=x.y.z overrides (at your own risk: Delta uses Spark internals).
#   Spark 3.5 -> Delta 3.3.3 (Scala 2.12), 4.0 -> 4.0.1, 4.1 -> 4.3.1, 4.2 -> 4.4.0 (Scala 2.13).
case "${DELTA_VERSION:+override}$SPARK_MM" in
  override*) DELTA=$DELTA_VERSION ;;
  3.5) DELTA=3.3.3 ;;
  4.0) DELTA=4.0.1 ;;
  4.1) DELTA=4.3.1 ;;
  4.2) DELTA=4.4.0 ;;
  *) echo "setup-jars: no known Delta release for Spark $SPARK (pin pyspark to 3.5 or 4.0-4.2); skipping" >&2
     exit 0 ;;
esac
if [ "${SPARK_MM%%.*}" = 3 ]; then DELTA_ARTIFACT=delta-spark_2.12; else DELTA_ARTIFACT=delta-spark_2.13; fi
[ "$SCALA" = "$([ "${SPARK_MM%%.*}" = 3 ] && echo 2.12 || echo 2.13)" ] || {
  echo "setup-jars: pyspark $SPARK ships Scala $SCALA, not the one $DELTA_ARTIFACT needs" >&2; exit 1; }

DEST=.jars/spark-$SPARK_MM
mkdir -p "$DEST"
POM=$(cat <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>laion-spark</groupId><artifactId>jars-spark-$SPARK_MM</artifactId><version>1</version>
  <!-- spark $SPARK, scala $SCALA, hadoop $HADOOP -->
  <dependencies>
    <dependency><groupId>io.delta</groupId><artifactId>$DELTA_ARTIFACT</artifactId><version>$DELTA</version></dependency>
    <dependency><groupId>org.apache.hadoop</groupId><artifactId>hadoop-aws</artifactId><version>$HADOOP</version>
      <exclusions><exclusion><groupId>org.wildfly.openssl</groupId><artifactId>*</artifactId></exclusion></exclusions>
    </dependency>
  </dependencies>
</project>
EOF
)
STAMP="$DEST/.pom.sha1"
SUM=$(printf '%s' "$POM" | sha1sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SUM" ] && ls "$DEST"/*.jar >/dev/null 2>&1; then
  exit 0
fi
command -v mvn >/dev/null || { echo "setup-jars: mvn not found (scripts/setup-system.sh installs maven)" >&2; exit 1; }
echo "setup-jars: Delta $DELTA + hadoop-aws $HADOOP for Spark $SPARK into $DEST (first time: minutes)"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
printf '%s\n' "$POM" >"$WORK/pom.xml"
rm -f "$DEST"/*.jar "$STAMP"
mvn -B -q -f "$WORK/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
  -DoutputDirectory="$PWD/$DEST"
# Drop what pyspark already ships (Scala, Hadoop client, Parquet, Jackson, log4j ... that Delta's
# kernel pulls in transitively): two versions of one library on a class path break Spark oddly.
"$PYTHON" - "$DEST" <<'PYEOF'
import os, re, sys, pyspark
dest = sys.argv[1]
def name(f):
    m = re.match(r"^(.+?)-\d", f)
    return m.group(1) if m else f
shipped = {name(f) for f in os.listdir(os.path.join(os.path.dirname(pyspark.__file__), "jars"))}
for f in sorted(os.listdir(dest)):
    if f.endswith(".jar") and name(f) in shipped:
        os.remove(os.path.join(dest, f))
PYEOF
printf '%s' "$SUM" >"$STAMP"
du -sh "$DEST" | sed 's/^/setup-jars: /'
