"""spark-submit entry point: `spark-submit jobs/build_index.py --config conf/emr.yaml [--set index.key=value]`."""
import sys

from laion_spark.job import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("index", sys.argv[1:]))
