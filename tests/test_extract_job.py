"""Extract stage through Spark: tables, dedup within a wave (repeats across waves are removed by
the readers' rule, `current_candidates`), resume, and a crash between commits."""
from __future__ import annotations

import shutil

import pytest

from laion_spark.config import Config
from laion_spark.extract import job as extract_job
from laion_spark.extract.extractor import extract_file_table


def _cfg(lake, inputs) -> Config:
    cfg = Config()
    cfg.lake = lake.cfg
    cfg.extract.inputs = [str(p) for p in inputs]
    return cfg


def _expected_uids(paths) -> set[int]:
    uids = set()
    for p in paths:
        t = extract_file_table(str(p), Config().extract)
        uids |= {r["uid"] for r in t.to_pylist() if r["kind"] == "candidate"}
    return uids


def test_extract_job_tables_dedup_resume_and_crash(spark, lake, real_data, tmp_path, monkeypatch):
    a = real_data / "CC-MAIN-20140820021334-00006-ip-10-180-136-8.ec2.internal.warc"
    b = real_data / "IAH-urls-wget.warc.gz"
    # The same bytes under another name: every pair is a within-run duplicate.
    b_copy = tmp_path / "IAH-urls-wget-copy.warc.gz"
    shutil.copy(b, b_copy)
    corrupt = tmp_path / "corrupt.warc.gz"
    data = bytearray(b.read_bytes())
    for k in range(5046 + 40, 5046 + 120):  # inside the member of a response record
        data[k] ^= 0x5A
    corrupt.write_bytes(bytes(data))

    # -- run 1: a crash after `candidates` and `failures` are committed, before `extract_files`.
    cfg = _cfg(lake, [a, b, b_copy, corrupt])
    real_append = lake.append

    def crashing_append(name, df, **kw):
        if name == extract_job.FILES_TABLE:
            raise RuntimeError("simulated crash before the resume record")
        return real_append(name, df, **kw)

    monkeypatch.setattr(lake, "append", crashing_append)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_job.run_extract(spark, cfg, lake)
    monkeypatch.setattr(lake, "append", real_append)
    after_crash = lake.read("candidates").count()

    # -- run 2: re-extracts the 4 files, adds no candidate or failure twice, writes the record.
    s2 = extract_job.run_extract(spark, cfg, lake)
    assert s2["files_extracted"] == 4 and s2["files_skipped"] == 0
    cands = lake.read("candidates")
    assert cands.count() == after_crash
    uids = [r["uid"] for r in cands.select("uid").collect()]
    assert len(uids) == len(set(uids)), "uid must be unique in candidates"
    assert set(uids) == _expected_uids([a, b, b_copy, corrupt])
    assert lake.read("failures").count() == 1
    (fail,) = lake.read("failures").collect()
    assert fail["source_file"] == str(corrupt) and fail["error"]
    files = {r["source_file"]: r for r in lake.read("extract_files").collect()}
    assert set(files) == {str(a), str(b), str(b_copy), str(corrupt)}
    assert files[str(a)]["n_html_pages"] == 3 and files[str(a)]["n_images"] == 861
    assert files[str(corrupt)]["n_failures"] == 1
    assert files[str(b)]["n_kept"] == files[str(b_copy)]["n_kept"] > 0
    # schema of the contract
    schema = dict(cands.dtypes)
    assert schema["uid"] == "bigint" and schema["fetch_time"] == "timestamp"
    for col in ("url", "text", "page_url", "language", "language_prob", "language_group",
                "source_file", "record_offset", "crawl", "title", "source_format"):
        assert col in schema

    # -- run 3: nothing pending.
    s3 = extract_job.run_extract(spark, cfg, lake)
    assert s3["files_extracted"] == 0 and s3["files_skipped"] == 4
    assert lake.read("candidates").count() == after_crash

    # -- run 4: a "new crawl" that repeats known pairs: its wave is deduped inside itself and
    # not against the table (no per-wave scan of `candidates`); readers see each uid once.
    dolma = real_data / "dolma-sample-0000.warc.gz"
    again = tmp_path / "a-again.warc"
    shutil.copy(a, again)
    cfg4 = _cfg(lake, [a, b, b_copy, corrupt, again, dolma])
    s4 = extract_job.run_extract(spark, cfg4, lake)
    assert s4["files_extracted"] == 2
    new_uids = _expected_uids([dolma]) - set(uids)
    assert s4["candidates_written"] == len(_expected_uids([again, dolma])) > len(new_uids) > 0
    assert lake.read("candidates").count() == after_crash + s4["candidates_written"]
    current = lake.read_current("candidates", ["uid", "source_file"])
    assert current.count() == after_crash + len(new_uids)
    # a repeated uid's row is the same whichever wave wrote it: min source_file (then offset)
    picked = {r["uid"]: r["source_file"] for r in current.collect()}
    only_a = _expected_uids([a]) - _expected_uids([b, dolma])
    assert only_a and all(picked[u] == min(str(a), str(again)) for u in only_a)


def test_cli_arguments_map_onto_config(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    extract_job.add_arguments(parser)
    args = parser.parse_args(["--input", "x.warc.gz", "-i", "y.wat.gz", "--sample", "3",
                              "--reader", "warcio", "--format", "wat", "--crawl", "CC-MAIN-2024-22"])
    cfg = Config()
    extract_job.apply_arguments(cfg, args)
    e = cfg.extract
    assert e.inputs == ["x.warc.gz", "y.wat.gz"] and e.sample_files == 3
    assert (e.warc_reader, e.input_format, e.crawl) == ("warcio", "wat", "CC-MAIN-2024-22")


def test_empty_inputs_is_a_clear_error(spark, lake):
    with pytest.raises(ValueError, match="no input files"):
        extract_job.run_extract(spark, Config(), lake)
