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


def test_sql_out_never_deletes_what_it_did_not_write(spark, lake, tmp_path):
    """Spark's overwrite deletes the whole --out path first: a folder's own files, a file, the
    lake itself given its root (all of `pairs` gone, measured) or a table being read. Now such an
    --out is refused and nothing is touched; an earlier output of the command is still replaced.
    A query Spark cannot parse or resolve ends with its one-line reason, not a Java stack."""
    rows = [(i, f"http://x/{i}.jpg") for i in range(30)]
    lake.append("pairs", spark.createDataFrame(rows, "uid long, url string"))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    common = ["--lake", lake.root, "--log-level", "WARNING"]
    for out, fmt in ((precious, "parquet"), (precious / "thesis.txt", "csv"),
                     (Path(lake.root), "csv"), (Path(lake.root) / "pairs", "parquet"),
                     (tmp_path, "json"), (precious, "delta")):
        with pytest.raises(SystemExit, match="--out") as exc:
            main(["sql", "SELECT uid FROM pairs", "--out", str(out), "--format", fmt, *common])
        assert str(out) in str(exc.value)
    assert (precious / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.txt"]
    assert lake.read("pairs").count() == 30
    out = tmp_path / "subset"
    for n in (5, 7):  # a new path, then the command's own earlier output: replaced
        assert main(["sql", f"SELECT uid FROM pairs WHERE uid < {n}", "--out", str(out),
                     *common]) == 0
        assert pq.read_table(str(out)).num_rows == n
    for query, reason in (("SELEC uid FROM pairs", "PARSE_SYNTAX_ERROR"),
                          ("SELECT * FROM nope", "TABLE_OR_VIEW_NOT_FOUND")):
        with pytest.raises(SystemExit, match=reason) as exc:
            main(["sql", query, *common])
        assert "\tat org.apache" not in str(exc.value)


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
