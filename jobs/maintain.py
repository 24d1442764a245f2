"""spark-submit entry point: `spark-submit jobs/maintain.py --config conf/emr.yaml [--set lake.key=value]`."""
import sys

from laion_spark.job import submit_main

if __name__ == "__main__":
    sys.exit(submit_main("maintain", sys.argv[1:]))
