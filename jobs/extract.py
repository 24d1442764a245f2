"""spark-submit entry point: `spark-submit jobs/extract.py --config conf/emr.yaml [--set extract.key=value]`."""
import sys

from laion_spark.job import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("extract", sys.argv[1:]))
