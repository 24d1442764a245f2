"""spark-submit entry point: `spark-submit jobs/download.py --config conf/emr.yaml [--set download.key=value]`."""
import sys

from laion_spark.job import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("download", sys.argv[1:]))
