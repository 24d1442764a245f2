"""The whole pipeline at 1x, 4x and 16x input size: does the driver's work stay flat?

    .venv/bin/python benchmarks/scale.py [--sizes 1,4,16] [--base-pages 20] [--master local[2]]

Input: the seeded demo web (laion_spark/demo), served on 127.0.0.1, scaled k-fold: k x
--base-pages pages in k WARC files, its images on the loopback server (some slow or failing on
purpose, as the demo web is). Each size runs in a fresh subprocess (a fresh JVM and Spark UI):
extract -> download -> score (the demo CLIP) -> index -> maintain, into a fresh lake.

Per stage it records, from Spark's REST status API on 127.0.0.1 (the app's own UI port):
Spark jobs, tasks (completed + failed + skipped), SQL scan "number of files read"; from the lake:
commits (table version deltas); from /proc: the peak RSS of the driver's Python and of the JVM
(in local mode the JVM holds the executors too), reset before each stage (clear_refs); wall time.
Then it fits cost = a + b * x per stage (x: waves for jobs, commits and serial wall time; units
for tasks and files read; see `report`) and prints what the fit gives at LAION-5B's size. Results also go to
bench-out/scale/results.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench-out" / "scale"
STAGES = ["extract", "download", "score", "index", "maintain"]
# LAION-5B's sizes for the extrapolation (see the score/download READMEs for the unit sizes).
LAION = {"candidates": 50e9, "pairs": 5.85e9, "wat_files": 90_000 * 12, "download_shards": 6e9 / 10_000,
         "score_shards": 6e9 / 10_000, "nodes": 100}

log = logging.getLogger("bench.scale")


# --------------------------------------------------------------------------- child: one size
def _rest(ui: str, path: str):
    for attempt in range(4):  # a loaded 2-core box can keep the UI thread busy for a while
        try:
            with urllib.request.urlopen(f"{ui}/api/v1{path}", timeout=120) as r:
                return json.load(r)
        except OSError:
            if attempt == 3:
                raise
            time.sleep(5)


def _spark_counts(spark) -> dict:
    """Jobs, tasks and SQL files read so far in this application (REST API on 127.0.0.1)."""
    sc = spark.sparkContext
    ui = (sc.uiWebUrl or "").replace(sc.getConf().get("spark.driver.host", "127.0.0.1"), "127.0.0.1")
    app = sc.applicationId
    jobs = _rest(ui, f"/applications/{app}/jobs")
    tasks = sum(j.get("numCompletedTasks", 0) + j.get("numFailedTasks", 0) + j.get("numSkippedTasks", 0)
                for j in jobs)
    files = 0
    for ex in _rest(ui, f"/applications/{app}/sql?details=true&planDescription=false&length=100000"):
        for node in ex.get("nodes", []):
            for m in node.get("metrics", []):
                if m.get("name") == "number of files read":
                    files += int(str(m.get("value", "0")).replace(",", "").split()[0] or 0)
    return {"jobs": len(jobs), "tasks": tasks, "files_read": files}


def _settle(spark, seconds: float = 1.0) -> None:
    """The status store is updated by a listener thread: wait until the job count stops moving."""
    before = None
    for _ in range(20):
        now = len(spark.sparkContext.statusTracker().getJobIdsForGroup(None) or [])
        if now == before:
            return
        before = now
        time.sleep(seconds)


def _rss_peak_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_peak(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_one(size: int, base_pages: int, master: str, clip_dir: str | None) -> dict:
    from laion_spark.config import load_config
    from laion_spark.demo.pipeline import PIPELINE, _import_stage
    from laion_spark.demo.server import serve_demo_web
    from laion_spark.job import JobContext
    from laion_spark.maintain import run_maintain

    work = OUT / f"{size}x"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    cfg = load_config(None, [f"lake.root={work / 'lake'}", f"spark.master={master}",
                             "spark.shuffle_partitions=4", "spark.log_level=ERROR"])
    if clip_dir:
        cfg.demo.clip_model_dir = clip_dir
    ctx = JobContext(cfg)
    spark, lake = ctx.spark, ctx.lake
    jvm_pid = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())
    me = os.getpid()
    stages: dict = {}
    units: dict = {}
    with serve_demo_web(work / "web", seed=size, n_pages=base_pages * size, n_warc_files=size) as (_, web):
        units["warc_files"] = len(web.warc_paths)
        for stage, module_name, fn_name in PIPELINE + [("maintain", None, None)]:
            module = _import_stage(module_name) if module_name else None
            if module is not None and hasattr(module, "prepare_demo"):
                module.prepare_demo(cfg, web, work)
                if stage == "download":
                    cfg.download.shard_size = 50  # shards grow with the input (the wave units)
            versions = {t: lake.version(t) for t in lake.tables()}
            _settle(spark)
            before = _spark_counts(spark)
            _reset_peak(me)
            _reset_peak(jvm_pid)
            started = time.time()
            if stage == "maintain":
                summary = run_maintain(spark, cfg, lake)
            else:
                summary = getattr(module, fn_name)(spark, cfg, lake)
            wall = time.time() - started
            _settle(spark)
            after = _spark_counts(spark)
            commits = sum((lake.version(t) or 0) - (versions.get(t) if versions.get(t) is not None else -1)
                          for t in lake.tables())
            stages[stage] = {
                "wall_s": round(wall, 1), "commits": commits,
                "driver_python_peak_mb": round(_rss_peak_kb(me) / 1024, 1),
                "jvm_peak_mb": round(_rss_peak_kb(jvm_pid) / 1024, 1),
                **{k: after[k] - before[k] for k in after},
                "summary": {k: v for k, v in (summary or {}).items() if isinstance(v, (int, float, str))}
                if isinstance(summary, dict) else {},
            }
            log.info("%dx %s: %s", size, stage, {k: v for k, v in stages[stage].items() if k != "summary"})
    units["candidates"] = lake.table_summary("candidates")["rows"] if lake.exists("candidates") else 0
    units["images"] = lake.table_summary("images")["rows"] if lake.exists("images") else 0
    units["pairs"] = lake.table_summary("pairs")["rows"] if lake.exists("pairs") else 0
    if lake.exists("images"):
        from pyspark.sql import functions as F

        units["download_shards"] = lake.read("images").select("shard").distinct().count()
    spark.stop()
    return {"size": size, "pages": base_pages * size, "units": units, "stages": stages}


# --------------------------------------------------------------------------- parent: sizes + fit
def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - b * mx, b


# The model: a stage's driver-side counts (jobs, commits) and its serial wall time follow its
# waves; tasks and files read follow its units (one task per unit, each wave reads its own files);
# the driver's peak RSS is flat (the max over sizes is shown). LAION-5B: 50B candidates from
# 12 crawls x 90k WAT files, 6B download rows in 10k-row shards, 5.85B pairs, on 100 nodes x 16
# cores (1,600 task slots) and, for score, 8 GPUs per node (800 GPU slots).
SLOTS = {"extract": 1600, "download": 1600, "score": 800}
PER_SLOT = {"extract": 2.0, "download": 2.0, "score": 2.0}  # config defaults: units per slot
MAX_WAVE = {"extract": 2048, "download": 4096, "score": 1024}  # config defaults: max units per wave
UNIT_OF = {"extract": ("warc_files", "wat_files"), "download": ("download_shards", "download_shards"),
           "score": ("download_shards", "score_shards")}


def laion_waves(stage: str) -> float:
    """Waves of `stage` at LAION-5B: units / (slots x units per slot, capped)."""
    import math

    size = min(MAX_WAVE[stage], math.ceil(SLOTS[stage] * PER_SLOT[stage]))
    return math.ceil(LAION[UNIT_OF[stage][1]] / size)


def _stage_units(r: dict, stage: str) -> float:
    s = r["stages"].get(stage, {}).get("summary", {})
    if stage == "extract":
        return float(s.get("files", r["units"].get("warc_files", 0)))
    return float(s.get("shards", r["units"].get("download_shards", 0)))


def report(results: list[dict]) -> str:
    """The measured counts per size, the fit a + b x (x = waves or units) and its value at
    LAION-5B's size."""
    sizes = " | ".join(f"{r['size']}x" for r in results)
    lines = [f"| stage | metric | {sizes} | fit (x) | at LAION-5B |",
             "|---|---|" + "---|" * len(results) + "---|---|"]
    for stage in STAGES:
        st = [r["stages"].get(stage, {}) for r in results]
        if stage in SLOTS:
            waves = [float(x.get("summary", {}).get("waves", 0)) for x in st]
            units = [_stage_units(r, stage) for r in results]
            lw, lu = laion_waves(stage), LAION[UNIT_OF[stage][1]]
            lines.append(f"| {stage} | units / waves | " + " | ".join(
                f"{u:g} / {w:g}" for u, w in zip(units, waves)) + f" | - | {lu:.3g} / {lw:.3g} |")
            for metric, xs, lx, name in (("jobs", waves, lw, "wave"), ("commits", waves, lw, "wave"),
                                         ("wall_s", waves, lw, "wave"), ("tasks", units, lu, "unit"),
                                         ("files_read", units, lu, "unit")):
                ys = [float(x.get(metric, 0)) for x in st]
                a, b = _fit(xs, ys)
                at = a + b * lx
                shown = f"{at / 3600:.3g} h (serial)" if metric == "wall_s" else f"{at:.3g}"
                lines.append(f"| {stage} | {metric} | " + " | ".join(f"{y:g}" for y in ys)
                             + f" | {a:.3g} + {b:.3g}/{name} | {shown} |")
        else:
            for metric in ("jobs", "tasks", "files_read", "commits", "wall_s"):
                ys = [float(x.get(metric, 0)) for x in st]
                lines.append(f"| {stage} | {metric} | " + " | ".join(f"{y:g}" for y in ys) + " | - | - |")
        for metric in ("driver_python_peak_mb", "jvm_peak_mb"):
            ys = [float(x.get(metric, 0)) for x in st]
            lines.append(f"| {stage} | {metric} | " + " | ".join(f"{y:g}" for y in ys)
                         + f" | max {max(ys or [0]):g} | - |")
    units = " ; ".join(f"{r['size']}x: " + ", ".join(f"{k}={v}" for k, v in r["units"].items()) for r in results)
    return "\n".join(lines) + "\n\nunits: " + units


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,4,16")
    p.add_argument("--base-pages", type=int, default=20)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--clip-dir", default=os.environ.get("LAION_SPARK_TEST_DEMO_CLIP"),
                   help="a trained demo CLIP folder (default: train one into the run folder)")
    p.add_argument("--reuse", action="store_true", help="reuse bench-out/scale/result-<k>x.json if there")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        result = run_one(args.one, args.base_pages, args.master, args.clip_dir)
        (OUT / f"result-{args.one}x.json").write_text(json.dumps(result, indent=1))
        return 0
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        started = time.time()
        done = OUT / f"result-{size}x.json"
        if args.reuse and done.exists():
            results.append(json.loads(done.read_text()))
            continue
        subprocess.run([sys.executable, __file__, "--one", str(size), "--base-pages", str(args.base_pages),
                        "--master", args.master] + (["--clip-dir", args.clip_dir] if args.clip_dir else []),
                       check=True)
        results.append(json.loads((OUT / f"result-{size}x.json").read_text()))
        log.info("%dx done in %.0fs", size, time.time() - started)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    load = os.getloadavg()
    print(report(results))
    print(f"\nmachine: {os.cpu_count()} cores, load average {load[0]:.1f} at the end; master {args.master}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
