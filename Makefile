# One-command set-up: every target that runs code depends on `setup`, which is idempotent.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LAKE ?= ./lake
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# The second Spark line the suite is tested on (EMR 7.x, Dataproc 2.2/2.3 ship Spark 3.5).
SPARK35 := .venv-spark35
SPARK35_PIN := pyspark==3.5.9
# The tests train the demo CLIP once into this folder and reuse it (both pytest runs).
export LAION_SPARK_TEST_DEMO_CLIP ?= $(CURDIR)/build/demo-clip

.PHONY: setup demo test bench clean

# Delta + hadoop-aws jars per pyspark (.jars/spark-x.y/) and the Spark 3.5 venv: each script is
# idempotent (a stamp of its inputs) and a no-op in under a second when nothing changed.
setup: $(STAMP)
	@bash scripts/setup-jars.sh $(BIN)/python
	@bash scripts/setup-spark-venv.sh $(SPARK35) '$(SPARK35_PIN)' $(VENV)
	@bash scripts/setup-jars.sh $(SPARK35)/bin/python

$(STAMP): setup.cfg pyproject.toml
	@bash scripts/setup-system.sh
	@test -x $(BIN)/python || $$(command -v $(PY) || command -v python3) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(FIND_LINKS) torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,spark]'
	$(BIN)/python -m pip install -q --no-deps clip-retrieval==2.45.0  # its ClipClient + front for the serve tests, not its heavy deps
	@touch $(STAMP)

demo: setup
	$(BIN)/laion-spark demo --lake $(LAKE)

# 1. The whole suite on pyspark 4.x, stages on delta-rs (the lake and S3 tests run both backends
#    themselves). 2. The extract and download job tests again on delta-spark. 3. On pyspark 3.5
#    (EMR 7, Dataproc 2.2): the table layer on both backends, the lake on S3, and every stage's job
#    tests (extract, download, score, index) and the extract-wave counting tests.
SPARK_SMOKE := tests/test_extract_job.py tests/test_download_job.py
test: setup
	LAION_LAKE_BACKEND=delta-rs $(BIN)/python -m pytest -q -ra tests
	LAION_LAKE_BACKEND=delta-spark $(BIN)/python -m pytest -q -ra $(SPARK_SMOKE)
	LAION_LAKE_BACKEND=delta-rs $(SPARK35)/bin/python -m pytest -q -ra -m spark -k "not extract_and_download" \
	  tests/test_lake.py tests/test_lake_s3.py tests/test_extract_job.py tests/test_download_job.py \
	  tests/test_score_pipeline.py tests/test_index_job.py tests/test_waves_dedup.py

clean:
	rm -rf $(LAKE) .pytest_cache build *.egg-info .jars $(SPARK35)
