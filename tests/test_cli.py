"""The command line: sub-commands are registered, `sql` sees every table as a view and writes
subsets, and config errors end with exit code 2 and the key named."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_spark.cli import build_parser, main
from laion_spark.config import ConfigError, _build
from laion_spark.job import COMMANDS

REPO = Path(__file__).resolve().parent.parent


def test_every_command_is_registered():
    parser, modules = build_parser(load_all=True)
    names = {c.name for c in COMMANDS}
    assert {"extract", "download", "score", "index", "sql", "demo", "train-demo-clip",
            "export-webdataset"} <= names
    assert modules["sql"] is not None and modules["demo"] is not None


def test_only_the_chosen_command_is_imported():
    """`laion-spark serve` parses its arguments without importing torch, pyspark or faiss (the
    supervising process of the service held ~438 MB when the CLI imported every stage)."""
    code = ("import sys; from laion_spark.cli import build_parser; "
            "p, m = build_parser(['serve', '--index', 'x']); "
            "a = p.parse_args(['serve', '--index', 'x', '--port', '5']); "
            "from laion_spark.job import context_from_args; "
            "from laion_spark.serve.job import build_spec, parse_index_args; "
            "build_spec(context_from_args(a).cfg, parse_index_args(a.index)); "
            "print(sorted(m), a.port, sorted(k for k in ('torch', 'pyspark', 'faiss', 'fastapi') "
            "if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['serve']", "5", "[]"]


def test_sql_writes_parquet_and_delta(spark, lake, tmp_path):
    rows = [(i, f"http://x/{i}.jpg", "de" if i % 2 else "en", i % 3 == 0) for i in range(30)]
    lake.append("pairs", spark.createDataFrame(rows, "uid long, url string, language string, passes_filter boolean"))
    out = tmp_path / "subset"
    rc = main(["sql", "SELECT uid, url FROM pairs WHERE passes_filter AND language = 'de'",
               "--lake", lake.root, "--out", str(out), "--format", "parquet", "--log-level", "WARNING"])
    assert rc == 0
    got = sorted(pq.read_table(str(out)).column("uid").to_pylist())
    assert got == [i for i in range(30) if i % 2 and i % 3 == 0]
    rc = main(["sql", "SELECT language, count(*) AS n FROM pairs GROUP BY language",
               "--lake", lake.root, "--out", "by_language", "--format", "delta"])
    assert rc == 0
    assert sorted((r.language, r.n) for r in lake.read("by_language").collect()) == [("de", 15), ("en", 15)]
    # the test's own session survives the command
    assert spark.range(3).count() == 3


def test_config_error_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lake:\n  rooot: /tmp/x\n")
    rc = main(["sql", "SELECT 1", "--config", str(bad)])
    assert rc == 2


def test_missing_required_value_is_refused():
    from dataclasses import dataclass

    @dataclass
    class Needs:
        path: str
        n: int = 1

    with pytest.raises(ConfigError, match=r"my.yaml: missing required key 'sec.path'"):
        _build(Needs, {"n": 2}, "sec", "my.yaml")


def test_console_script_help():
    exe = Path(sys.executable).parent / "laion-spark"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "extract" in out.stdout and "sql" in out.stdout
