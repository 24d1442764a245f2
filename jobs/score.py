"""spark-submit entry point: `spark-submit jobs/score.py --config conf/emr.yaml [--set score.key=value]`."""
import sys

from laion_spark.job import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("score", sys.argv[1:]))
