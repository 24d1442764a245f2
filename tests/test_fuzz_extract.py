"""Seeded fuzz of the extract core on the real WARC/WAT files (issue 12): a few hundred
mutations (bit flips, truncations, leading junk, lying Content-Lengths, bad WARC headers,
negative chunk sizes, gzip bombs, deep nesting, dropped and repeated bytes), run in worker
subprocesses under RLIMIT_AS and a time limit. No crash, no hang, no MemoryError, peak RSS
under the limit, and every record intact in a mutated file yields the rows it yields in the
unmutated one. The engine and a longer run: benchmarks/fuzz_extract.py."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _engine():
    spec = importlib.util.spec_from_file_location("fuzz_extract", REPO / "benchmarks" / "fuzz_extract.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def test_fuzz_extract_seeded_corpus(real_data, tmp_path):
    fuzz = _engine()
    missing = [f for f in fuzz.CI_FILES if not (real_data / f).exists()]
    if missing:
        pytest.skip(f"real files missing: {missing}")
    summary = fuzz.fuzz(fuzz.CI_FILES, n_mutations=240, seed=12, workdir=tmp_path, time_per_job_s=30.0)
    assert summary["mutations"] >= 200
    assert set(summary["by_kind"]) == set(fuzz.MUTATIONS)  # every kind of damage was tried
    assert summary["intact_records_checked"] > 1000
    assert not summary["problems"], summary["problems"][:10]
    assert summary["max_file_s"] < 20  # no file near the per-file budget (a hang)
