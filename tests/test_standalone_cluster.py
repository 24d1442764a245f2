"""A Spark standalone cluster (master + 2 workers, 1 core each, 127.0.0.1) started by
deploy/standalone/start-cluster.sh runs extract -> download -> score -> index with
`spark-submit jobs/*.py` (deploy/standalone/submit.sh) on the demo web. A worker is killed by PID
while download runs; the tables must still hold one `images` row per candidate, a re-run of every
stage must commit nothing, and delta-rs and DuckDB (reading the Delta log itself) must read the
same rows.

Each spark-submit pays a driver JVM, two executor JVMs and their Pythons; the per-stage wall
times are logged (and are what deploy/standalone/README.md states).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "deploy" / "standalone"
N_PAGES = 16  # about 60 candidates: several download shards, a few minutes of cluster time in all
STAGES = ("extract", "download", "score", "index")

pytestmark = [
    pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("JAVA_HOME"),
                       reason="a standalone cluster needs java"),
    # 10 JVM starts (master, 2 workers, 8 drivers) plus 15 executors: minutes on 2 busy cores
    pytest.mark.timeout(2100),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    # Executors import this checkout's laion_spark (the workers pass their environment on).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYSPARK_GATEWAY_PORT", None)
    env.pop("SPARK_HOME", None)
    return env


# Small-cluster JVM settings (test speed only): C1-only JIT and the serial GC start faster on
# 2 busy cores; no driver UI.
FAST_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
SUBMIT_CONF = ["--conf", f"spark.driver.extraJavaOptions={FAST_JVM}",
               "--conf", f"spark.executor.extraJavaOptions={FAST_JVM}",
               "--conf", "spark.ui.enabled=false"]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a deploy script in its own session; on a timeout or error kill the whole group (the
    spark-submit JVM and its Python driver), so nothing outlives the test."""
    env = _env()
    env["SPARK_DAEMON_JAVA_OPTS"] = FAST_JVM
    proc = subprocess.Popen(["bash", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


def _script(name: str, *args: str, timeout: float = 300, check: bool = True):
    proc = _run([str(SCRIPTS / name), *args], timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-8000:]}")
    return proc


def _submit(state: Path, stage: str, config: Path, timeout: float = 600, tag: str = ""):
    proc = _script("submit.sh", "--state-dir", str(state), *SUBMIT_CONF, stage,
                   "--config", str(config), timeout=timeout)
    (state / "logs" / f"submit-{tag}{stage}.log").write_text(proc.stdout)
    return proc


def _delta_versions(lake_root: Path) -> dict[str, int]:
    from deltalake import DeltaTable

    return {p.name: DeltaTable(str(p)).version() for p in sorted(lake_root.iterdir())
            if (p / "_delta_log").is_dir()}


def _duckdb_read_delta(table: Path):
    """Read a Delta table with DuckDB alone: the live files are the log's `add` paths (checkpoint
    first, then the JSON commits after it) minus its `remove` paths; DuckDB reads those Parquet
    files. No delta-rs involved, so this is a second, independent reader."""
    import duckdb
    from urllib.parse import unquote

    con = duckdb.connect()
    log_dir = table / "_delta_log"
    cp_version = -1
    live: set[str] = set()
    last = log_dir / "_last_checkpoint"
    if last.exists():
        cp_version = json.loads(last.read_text())["version"]
        cp_files = [str(p) for p in log_dir.glob(f"{cp_version:020d}.checkpoint*.parquet")]
        live = {r[0] for r in con.execute(
            "select add.path from read_parquet(?) where add is not null", [cp_files]).fetchall()}
    commits = sorted(p for p in log_dir.glob("*.json") if int(p.stem) > cp_version)
    for commit in commits:
        actions = con.execute(
            "select add.path, remove.path from read_json(?, format='newline_delimited', "
            "columns={'add': 'STRUCT(path VARCHAR)', 'remove': 'STRUCT(path VARCHAR)'})",
            [str(commit)]).fetchall()
        for added, removed in actions:
            if added:
                live.add(added)
            if removed:
                live.discard(removed)
    files = sorted(str(table / unquote(p)) for p in live)
    assert files, f"{table}: no live files in the Delta log"
    return con.read_parquet(files).to_arrow_table()


def _sorted_by_uid(t):
    import pyarrow.compute as pc

    return t.take(pc.sort_indices(t, sort_keys=[("uid", "ascending")]))


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, demo_clip_dir):
    """Start the cluster, run the four stages (killing worker 1 during download), re-run them."""
    from laion_spark.demo.server import serve_demo_web

    root = tmp_path_factory.mktemp("standalone")
    state = root / "cluster"
    lake = root / "lake"
    timings: dict[str, float] = {}
    result: dict = {"root": root, "lake": lake, "timings": timings}
    with serve_demo_web(root / "web", seed=0, n_pages=N_PAGES) as (server, web):
        cfg = {
            "spark": {"log_level": "WARN", "shuffle_partitions": 2},
            "lake": {"root": str(lake)},
            "extract": {"inputs": [str(p) for p in web.warc_paths], "input_format": "warc",
                        "crawl": "demo"},
            # The demo web serves on 127.0.0.1 and has slow images: loopback on, short deadlines,
            # small shards so download is several waves of tasks on both workers.
            "download": {"allow_loopback": True, "total_deadline_s": 4.0, "read_timeout_s": 2.0,
                         "connect_timeout_s": 2.0, "shard_size": 3, "threads_per_task": 8},
            "score": {"clip_model": str(demo_clip_dir),
                      "multilingual_text_model": str(demo_clip_dir / "multilingual"),
                      "device": "cpu", "batch_size": 32},
            "index": {"output": str(lake / "_indices"), "recall_queries": 50},
        }
        config = root / "cluster.yaml"
        config.write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        _script("start-cluster.sh", "--state-dir", str(state), "--workers", "2", "--cores", "1",
                "--memory", "1g", "--port", str(_free_port()), "--webui-port", "0",
                "--python", sys.executable)
        timings["start_cluster"] = round(time.perf_counter() - t0, 1)
        worker_pids = [int((state / f"worker-{i}.pid").read_text()) for i in (1, 2)]
        result["worker_pids"] = worker_pids
        try:
            for stage in STAGES:
                t0 = time.perf_counter()
                if stage == "download":  # score, index and the re-runs go on with worker 2
                    result["kill"] = _download_killing_worker(state, config, lake, worker_pids[0])
                else:
                    _submit(state, stage, config)
                timings[stage] = round(time.perf_counter() - t0, 1)
            result["versions"] = _delta_versions(lake)
            result["index_meta"] = sorted(lake.glob("_indices/*/metadata.parquet"))
            result["index_bytes"] = {str(p): p.read_bytes() for p in result["index_meta"]}
            for stage in STAGES:
                t0 = time.perf_counter()
                _submit(state, stage, config, tag="rerun-")
                timings[f"rerun_{stage}"] = round(time.perf_counter() - t0, 1)
            result["versions_after"] = _delta_versions(lake)
        finally:
            _script("stop-cluster.sh", "--state-dir", str(state), check=False, timeout=120)
    log.warning("standalone cluster timings (s): %s", json.dumps(timings))
    (root / "timings.json").write_text(json.dumps(timings, indent=1))
    return result


def _running_tasks(worker_dir: Path) -> int:
    """Tasks the worker's executors of the newest application have started and not finished
    (from the executor logs: one 'Running task' and one 'Finished task' line per task)."""
    apps = sorted(worker_dir.glob("app-*"))
    if not apps:
        return 0
    n = 0
    for stderr in apps[-1].glob("*/stderr"):
        text = stderr.read_text(errors="replace")
        n += text.count("Executor: Running task") - text.count("Executor: Finished task")
    return n


def _download_killing_worker(state: Path, config: Path, lake: Path, victim: int) -> dict:
    """Run the download stage and SIGKILL worker 1's JVM in the middle of a task, after the
    first wave is committed: some shards are in the table, the rest are running or pending."""
    env = _env()
    proc = subprocess.Popen(["bash", str(SCRIPTS / "submit.sh"), "--state-dir", str(state),
                             *SUBMIT_CONF, "download", "--config", str(config)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        first_commit = lake / "images" / "_delta_log" / f"{0:020d}.json"
        deadline = time.monotonic() + 500
        killed = {"while_running": False, "during_task": False}
        while time.monotonic() < deadline and proc.poll() is None:
            if first_commit.exists() and _running_tasks(state / "work" / "worker-1") > 0:
                os.kill(victim, signal.SIGKILL)
                killed = {"while_running": proc.poll() is None, "during_task": True}
                break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=600)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    (state / "logs" / "submit-download.log").write_text(out)
    assert proc.returncode == 0, f"download failed after the worker was killed:\n{out[-8000:]}"
    log.warning("download after the kill: %d 'Lost task' lines", out.count("Lost task"))
    return {"killed_while_running": killed["while_running"], "during_task": killed["during_task"],
            "output": out, "victim_alive": _alive(victim)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_worker_killed_during_download(cluster_run):
    kill = cluster_run["kill"]
    assert kill["during_task"], "worker 1 ran no task after the first commit: nothing was killed"
    assert kill["killed_while_running"]
    assert not kill["victim_alive"]
    # the driver lost the executor with a task on it, ran the task again elsewhere and finished
    out = kill["output"]
    assert "Lost executor" in out or "worker lost" in out.lower(), out[-4000:]


def test_one_images_row_per_candidate(cluster_run):
    from deltalake import DeltaTable

    lake = cluster_run["lake"]
    candidates = DeltaTable(str(lake / "candidates")).to_pyarrow_table(columns=["uid"])
    images = DeltaTable(str(lake / "images")).to_pyarrow_table(columns=["uid", "status"])
    cand = candidates.column("uid").to_pylist()
    img = images.column("uid").to_pylist()
    assert len(cand) > 20
    assert len(img) == len(cand) and sorted(img) == sorted(cand)  # none lost, none twice
    statuses = set(images.column("status").to_pylist())
    assert "success" in statuses and "failed" in statuses  # the demo web fails some by design
    pairs = DeltaTable(str(lake / "pairs")).to_pyarrow_table(columns=["uid"])
    n_success = images.column("status").to_pylist().count("success")
    assert sorted(pairs.column("uid").to_pylist()) == sorted(
        u for u, s in zip(img, images.column("status").to_pylist()) if s == "success")
    assert pairs.num_rows == n_success


def test_index_built(cluster_run):
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    metas = cluster_run["index_meta"]
    assert len(metas) == 1, metas
    pairs = DeltaTable(str(cluster_run["lake"] / "pairs")).to_pyarrow_table(
        columns=["uid", "passes_filter"])
    kept = sorted(u for u, k in zip(pairs.column("uid").to_pylist(),
                                    pairs.column("passes_filter").to_pylist()) if k)
    assert sorted(pq.read_table(metas[0]).column("uid").to_pylist()) == kept
    assert list(metas[0].parent.glob("*.index"))


def test_rerun_commits_nothing(cluster_run):
    before, after = cluster_run["versions"], cluster_run["versions_after"]
    assert {"candidates", "images", "pairs"} <= set(before)
    assert after == before
    # the index of the same pairs version is rebuilt into the same folder with the same rows
    metas = sorted(cluster_run["lake"].glob("_indices/*/metadata.parquet"))
    assert [str(p) for p in metas] == list(cluster_run["index_bytes"])
    for p in metas:
        assert p.read_bytes() == cluster_run["index_bytes"][str(p)]


@pytest.mark.parametrize("table", ["candidates", "images", "pairs"])
def test_delta_rs_and_duckdb_read_the_same_rows(cluster_run, table):
    from deltalake import DeltaTable

    path = cluster_run["lake"] / table
    by_delta_rs = _sorted_by_uid(DeltaTable(str(path)).to_pyarrow_table())
    by_duckdb = _sorted_by_uid(_duckdb_read_delta(path))
    assert by_duckdb.num_rows == by_delta_rs.num_rows > 0
    assert sorted(by_duckdb.column_names) == sorted(by_delta_rs.column_names)
    by_duckdb = by_duckdb.select(by_delta_rs.column_names).cast(by_delta_rs.schema)
    assert by_duckdb.equals(by_delta_rs)


def test_timings_logged(cluster_run):
    timings = cluster_run["timings"]
    for stage in STAGES:
        assert timings[stage] > 0 and timings[f"rerun_{stage}"] > 0
