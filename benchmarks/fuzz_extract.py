"""Fuzz the extract core with seeded mutations of the real WARC/WAT files (issue 12).

    .venv/bin/python benchmarks/fuzz_extract.py [--mutations 3000] [--seed 1] [--files all]

Each mutated file is extracted in a worker subprocess that runs many of them in a row, under an
address-space limit (RLIMIT_AS) and a time limit. A worker writes one JSON line per finished
file, so a crash or a hang names its file: the first one without a line (the parent restarts a
worker on the rest). Checked for every mutated file: no crash, no hang, no MemoryError, peak RSS
under the limit, and every record that is intact in it (its bytes unchanged, found by where the
mutation fell) yields exactly the candidate rows it yields in the unmutated file.
`tests/test_fuzz_extract.py` runs a small seeded corpus of this in CI.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
REAL = (REPO.parent / "shared" / "data" / "real").resolve()
log = logging.getLogger("bench.fuzz_extract")

# (name, how the fuzzer sees it): plain files are mutated record by record; .gz ones by bytes
# (bit flips, truncation, junk) and member by member (a record re-compressed after a mutation).
CI_FILES = ["CC-MAIN-20140820021334-00006-ip-10-180-136-8.ec2.internal.warc",
            "CC-MAIN-20140820021334-00006-ip-10-180-136-8.ec2.internal.warc.wat",
            "webindex-wat-18.warc", "ia-web-commons-link-extraction-test.warc",
            "whirlwind.warc.gz", "clipped.warc.gz"]
ALL_FILES = CI_FILES + ["warcfile.warc.gz", "IAH-urls-wget.warc.gz", "dolma-sample-0000.warc.gz",
                        "govuk-BL-20140325121225068-00000.warc.gz"]
MUTATIONS = ["bit_flips", "truncate", "leading_junk", "length_larger", "length_zero", "length_halved",
             "length_huge", "length_negative", "version_9_9", "lf_only_header", "bad_type",
             "negative_chunk", "gzip_bomb", "deep_nesting", "drop_bytes", "duplicate_record"]
MEMORY_LIMIT = 3 << 30  # RLIMIT_AS of a worker (a Python with pyarrow, lexbor, gcld3 maps ~1 GiB)
RSS_LIMIT = 1536 << 20  # the peak resident memory allowed


@dataclass
class Mutated:
    """A mutated file: its bytes and, for each record of the original, where it now starts
    (None when the mutation touched its bytes)."""

    id: str
    data: bytes
    moved: dict  # original offset -> new offset, intact records only


def record_spans(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every record (gzip member for .gz) of an unmutated file, by the reader."""
    from laion_spark.extract.records import RawRecord, iter_records

    data = path.read_bytes()
    import io

    starts = [r.offset for r in iter_records(io.BytesIO(data), wants_body=lambda r: False)
              if isinstance(r, RawRecord)]
    return list(zip(starts, starts[1:] + [len(data)]))


def _shifted(spans, a: int, b: int, delta: int) -> dict:
    """Records wholly before [a, b) keep their offset, wholly after it move by delta."""
    moved = {}
    for s, e in spans:
        if e <= a:
            moved[s] = s
        elif s >= b:
            moved[s] = s + delta
    return moved


def _replace(data: bytes, spans, a: int, b: int, new: bytes) -> tuple[bytes, dict]:
    return data[:a] + new + data[b:], _shifted(spans, a, b, len(new) - (b - a))


def _header_end(rec: bytes) -> int:
    end = rec.find(b"\r\n\r\n")
    return end if end >= 0 else rec.find(b"\n\n")


def _rebuild(rec: bytes, block: bytes) -> bytes:
    """The record with a new block and a Content-Length that matches it (digest left stale)."""
    import re

    end = _header_end(rec)
    head = re.sub(rb"(?im)^Content-Length:[^\r\n]*", b"Content-Length: %d" % len(block), rec[:end])
    return head + b"\r\n\r\n" + block + b"\r\n\r\n"


def _html_records(data: bytes, spans, gz: bool) -> list[int]:
    out = []
    for i, (s, e) in enumerate(spans):
        rec = _plain(data[s:e], gz)
        if b"WARC-Type: response" in rec[:2000] and b"text/html" in rec[:4000].lower():
            out.append(i)
    return out


def _plain(raw: bytes, gz: bool) -> bytes:
    if not gz:
        return raw
    try:
        return zlib.decompressobj(47).decompress(raw)
    except zlib.error:
        return b""


def mutate(name: str, data: bytes, spans: list, gz: bool, rng: random.Random, mid: str) -> Optional[Mutated]:
    """One seeded mutation; None when the file has nothing it applies to."""
    n = len(data)
    if name == "bit_flips":
        out = bytearray(data)
        hit = []
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(n)
            out[i] ^= 1 << rng.randrange(8)
            hit.append(i)
        moved = {s: s for s, e in spans if not any(s <= i < e for i in hit)}
        return Mutated(mid, bytes(out), moved)
    if name == "truncate":
        t = rng.randrange(n)
        return Mutated(mid, data[:t], {s: s for s, e in spans if e <= t})
    if name == "leading_junk":
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        return Mutated(mid, junk + data, {s: s + len(junk) for s, _ in spans})
    if name == "drop_bytes":
        a = rng.randrange(n)
        b = min(n, a + rng.randint(1, 512))
        new, moved = _replace(data, spans, a, b, b"")
        return Mutated(mid, new, moved)
    if name == "duplicate_record":
        s, e = spans[rng.randrange(len(spans))]
        new, moved = _replace(data, spans, e, e, data[s:e])
        return Mutated(mid, new, moved)
    # record-level mutations: on the plain bytes of one record (re-compressed for .gz)
    if name in ("negative_chunk", "gzip_bomb", "deep_nesting"):
        candidates = _html_records(data, spans, gz)
    else:
        candidates = list(range(len(spans)))
    if not candidates:
        return None
    k = rng.choice(candidates)
    s, e = spans[k]
    rec = _plain(data[s:e], gz)
    if not rec:
        return None
    end = _header_end(rec)
    import re

    m = re.search(rb"(?im)^Content-Length:\s*(\d+)", rec[:end])
    if name.startswith("length_") and m is None:
        return None
    if name.startswith("length_"):
        length = int(m.group(1))
        value = {"length_larger": length * rng.randint(2, 5) + 7, "length_zero": 0,
                 "length_halved": length // 2, "length_huge": 10 ** 11 + rng.randrange(10 ** 6),
                 "length_negative": -rng.randint(1, 9999)}[name]
        new_rec = rec[:m.start(1)] + str(value).encode() + rec[m.end(1):]
    elif name == "version_9_9":
        new_rec = rec.replace(b"WARC/1.", b"WARC/9.", 1)
    elif name == "lf_only_header":
        new_rec = rec[:end].replace(b"\r\n", b"\n") + b"\n\n" + rec[end + 4:]
    elif name == "bad_type":
        new_rec = re.sub(rb"WARC-Type:[^\r\n]*", rng.choice([b"WARC-Type: \xff\xfe", b"WARC-Type:",
                                                            b"WARC-Type: resp\x00onse", b"WARC-Typo: response"]),
                         rec, count=1)
    else:
        block_start = end + 4
        block = rec[block_start:]
        http_end = block.find(b"\r\n\r\n")
        http_head = block[:http_end] if http_end >= 0 else b"HTTP/1.1 200 OK\r\nContent-Type: text/html"
        http_head = re.sub(rb"(?im)^(Transfer-Encoding|Content-Encoding|Content-Length):[^\r\n]*\r\n?", b"",
                           http_head)
        if name == "negative_chunk":
            body = block[http_end + 4:] if http_end >= 0 else block
            new_block = (http_head + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n<html\r\n-6\r\n" + body)
        elif name == "gzip_bomb":
            size = rng.choice([20, 60, 200]) << 20
            bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
            parts = [bomb.compress(b"<html><body><p>" + b" " * (1 << 20)) for _ in range(size >> 20)]
            parts.append(bomb.flush())
            new_block = http_head + b"\r\nContent-Encoding: gzip\r\n\r\n" + b"".join(parts)
        else:  # deep_nesting
            depth = rng.choice([20_000, 100_000, 300_000])
            tag = rng.choice([b"<div>", b"<ul>", b"<span><div>", b"<table><tr><td><div>"])
            new_block = http_head + b"\r\n\r\n<html><body>" + tag * depth + b"<img src=x.jpg alt='deep image'>"
        new_rec = _rebuild(rec, new_block)
    raw = gzip.compress(new_rec) if gz else new_rec
    new, moved = _replace(data, spans, s, e, raw)
    return Mutated(mid, new, moved)


# ------------------------------------------------------------------------------- worker
def rows_by_record(path: str) -> tuple[dict, list, dict]:
    """({offset: sorted [url, text] pairs}, failure rows, file row) of one file."""
    from laion_spark.config import ExtractConfig
    from laion_spark.extract.extractor import extract_file_batches

    by_offset: dict = {}
    failures = []
    file_row = {}
    for batch in extract_file_batches(path, ExtractConfig()):
        for row in batch.to_pylist():
            if row["kind"] == "candidate":
                by_offset.setdefault(str(row["record_offset"]), []).append([row["url"], row["text"]])
            elif row["kind"] == "failure":
                failures.append([row["record_offset"], row["error"][:200]])
            else:
                file_row = {"n_records": row["n_records"], "n_failures": row["n_failures"]}
    return {k: sorted(v) for k, v in by_offset.items()}, failures, file_row


def worker(jobs_file: str) -> None:
    """Extract each listed file; one JSON line per file, flushed before the next starts."""
    jobs = json.loads(Path(jobs_file).read_text())
    for job in jobs:
        started = time.perf_counter()
        cands, failures, file_row = rows_by_record(job["path"])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sys.stdout.write(json.dumps({"id": job["id"], "cands": cands, "failures": failures,
                                     "file": file_row, "seconds": time.perf_counter() - started,
                                     "peak_rss": peak}) + "\n")
        sys.stdout.flush()


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_jobs(jobs: list[dict], workdir: Path, time_per_job_s: float) -> tuple[dict, list]:
    """Results by job id, and the problems: jobs that crashed or hung their worker."""
    results: dict = {}
    problems = []
    pending = list(jobs)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    while pending:
        jobs_file = workdir / "jobs.json"
        jobs_file.write_text(json.dumps(pending))
        budget = 20 + time_per_job_s * len(pending)
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(jobs_file)],
                                  capture_output=True, text=True, timeout=budget, preexec_fn=_limit_memory,
                                  env=env, cwd=str(REPO))
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err, rc = "timeout", "timeout"
        done = 0
        for line in out.splitlines():
            rec = json.loads(line)
            results[rec["id"]] = rec
            done += 1
        if done == len(pending):
            break
        culprit = pending[done]
        problems.append({"id": culprit["id"], "rc": rc, "stderr": err[-1500:]})
        pending = pending[done + 1:]
    return results, problems


def check(results: dict, baselines: dict, muts: dict) -> list:
    """For each mutated file: every intact record's rows as in the unmutated file (records
    that gave a failure row there are not good records); no MemoryError; peak RSS under the
    limit."""
    problems = []
    for mid, res in results.items():
        if res["peak_rss"] > RSS_LIMIT:
            problems.append({"id": mid, "problem": f"peak RSS {res['peak_rss'] >> 20} MiB"})
        if any("MemoryError" in f[1] for f in res["failures"]):
            problems.append({"id": mid, "problem": "MemoryError"})
        if mid.endswith("@orig"):
            continue
        base, base_failed = baselines[muts[mid]["file"]]
        for old, new in muts[mid]["moved"].items():
            if old in base_failed:  # not a good record in the original (a clipped file's last)
                continue
            want = base.get(str(old), [])
            got = res["cands"].get(str(new), [])
            if want != got:
                problems.append({"id": mid, "problem": f"record at {old} (now {new}): "
                                                       f"{len(want)} rows before, {len(got)} after",
                                 "failures": res["failures"][:5]})
    return problems


def fuzz(files: list[str], n_mutations: int, seed: int, workdir: Path, time_per_job_s: float = 30.0) -> dict:
    """Build the seeded corpus, run it, check it. Returns the summary (problems listed)."""
    rng = random.Random(seed)
    started = time.perf_counter()
    jobs, muts, baselines, spans_of = [], {}, {}, {}
    for name in files:
        path = REAL / name
        spans_of[name] = record_spans(path)
        jobs.append({"id": f"{name}@orig", "path": str(path)})
    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    kinds = {}
    for i in range(n_mutations):
        name = files[i % len(files)]
        kind = MUTATIONS[(i // len(files)) % len(MUTATIONS)]
        data = (REAL / name).read_bytes()
        mid = f"{name}#{i}:{kind}"
        m = mutate(kind, data, spans_of[name], name.endswith(".gz"), rng, mid)
        if m is None:
            continue
        suffix = ".warc.gz" if name.endswith(".gz") else ".warc"
        p = corpus / f"m{i}{suffix}"
        p.write_bytes(m.data)
        jobs.append({"id": mid, "path": str(p)})
        muts[mid] = {"file": name, "moved": m.moved}
        kinds[kind] = kinds.get(kind, 0) + 1
    results, problems = run_jobs(jobs, workdir, time_per_job_s)
    for name in files:
        orig = results.get(f"{name}@orig", {"cands": {}, "failures": []})
        baselines[name] = (orig["cands"], {f[0] for f in orig["failures"]})
    problems += check(results, baselines, muts)
    seconds = [r["seconds"] for r in results.values()]
    summary = {"files": files, "mutations": len(muts), "by_kind": kinds, "seed": seed,
               "problems": problems, "max_file_s": max(seconds) if seconds else 0.0,
               "peak_rss_mib": max((r["peak_rss"] for r in results.values()), default=0) >> 20,
               "intact_records_checked": sum(len(m["moved"]) for m in muts.values()),
               "wall_s": time.perf_counter() - started}
    return summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--mutations", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--files", default="all", help="all | ci")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = ALL_FILES if args.files == "all" else CI_FILES
    with tempfile.TemporaryDirectory(prefix="fuzz-extract-") as tmp:
        summary = fuzz(files, args.mutations, args.seed, Path(tmp))
    log.info(json.dumps({k: v for k, v in summary.items() if k != "problems"}, indent=1))
    for p in summary["problems"][:20]:
        log.info("PROBLEM %s", p)
    log.info("%d problems", len(summary["problems"]))
    out = REPO / "bench-out" / "fuzz_extract"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
