"""Download stage vs img2dataset: same loopback image server, same URL list, one run each.

    .venv/bin/python benchmarks/download.py [--urls 10000] [--threads 32] [--processes 2]

What it does:
  1. draws a set of realistic JPEGs of mixed sizes (smooth photographic content, 320 px to
     2,400 px wide, quality 85-92) once, under bench-out/download/;
  2. serves them from a loopback server with several worker processes sharing one listening
     socket, with a small share of failures: 3 % 404, 1 % 500, 1 % HTML served as image/jpeg,
     1 % slow (answer after 1.5 s);
  3. runs our job (Spark local[P], P = --processes; threads_per_task = --threads) on a
     `candidates` table holding the URL list, and img2dataset (installed from PyPI into
     .venv-peers-download/, created here if missing) with processes_count=P, thread_count=T,
     resize_mode=border, image_size=256, encode_format=jpg, encode_quality=95, parquet output;
  4. prints images/s and CPU seconds per image for each, and the ratio of images per CPU-second.

CPU accounting: img2dataset = the whole subprocess tree (getrusage of children), its own start-up
included. Ours = two runs of the job in one session: cold (the JVM start with the driver's
imports, then the first job) and warm (the same job again on a fresh `images` table); each split
into driver Python / the JVM itself / the Python workers under the JVM (from /proc), and by job
phase (the job logs a `phase` record at each boundary). `--job-module` runs another job.py (on
PYTHONPATH) for a before/after. The image server's CPU is in neither.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench-out" / "download"
PEER_VENV = REPO / ".venv-peers-download"
IMG2DATASET_VERSION = "1.47.0"

log = logging.getLogger("bench.download")


# --------------------------------------------------------------------------- the image corpus
def draw_photo(w: int, h: int, rng: random.Random) -> bytes:
    """Smooth gradients, soft shapes and mild sensor noise: compresses like a photograph."""
    from PIL import Image, ImageDraw, ImageFilter

    small = Image.new("RGB", (max(8, w // 8), max(8, h // 8)))
    draw = ImageDraw.Draw(small)
    sw, sh = small.size
    top = tuple(rng.randrange(256) for _ in range(3))
    bottom = tuple(rng.randrange(256) for _ in range(3))
    for y in range(sh):
        t = y / max(1, sh - 1)
        draw.line([(0, y), (sw, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(rng.randint(4, 12)):
        x0, y0 = rng.randrange(sw), rng.randrange(sh)
        x1, y1 = x0 + rng.randint(2, sw // 2 + 2), y0 + rng.randint(2, sh // 2 + 2)
        draw.ellipse([x0, y0, x1, y1], fill=tuple(rng.randrange(256) for _ in range(3)))
    img = small.resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    noise = Image.effect_noise((w, h), 24).convert("RGB")
    img = Image.blend(img, noise, 0.12)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=rng.choice((85, 88, 90, 92)))
    return out.getvalue()


def build_corpus(n_images: int, seed: int = 0) -> list[bytes]:
    folder = OUT / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images = []
    for k in range(n_images):
        path = folder / f"{k:04d}.jpg"
        if path.exists():
            images.append(path.read_bytes())
            continue
        r = rng.random()
        if r < 0.4:
            w = rng.randint(320, 640)
        elif r < 0.8:
            w = rng.randint(640, 1280)
        else:
            w = rng.randint(1280, 2400)
        h = int(w * rng.choice((0.56, 0.66, 0.75, 1.0, 1.33)))
        data = draw_photo(w, h, random.Random(seed * 100003 + k))
        path.write_bytes(data)
        images.append(data)
    return images


# --------------------------------------------------------------------------- the server
def _serve(sock: socket.socket, images: list[bytes]) -> None:
    html = b"<!DOCTYPE html><html><body>" + b"<p>hotlinking is not allowed</p>" * 200 + b"</body></html>"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            parts = self.path.split("?", 1)[0].strip("/").split("/")
            kind, ident = parts[0], parts[-1].split(".")[0]
            try:
                if kind == "img":
                    self._send(200, images[int(ident) % len(images)], "image/jpeg")
                elif kind == "slow":
                    time.sleep(1.5)
                    self._send(200, images[int(ident) % len(images)], "image/jpeg")
                elif kind == "error":
                    self._send(500, b"internal error", "text/plain")
                elif kind == "bad":
                    self._send(200, html, "image/jpeg")
                else:
                    self._send(404, b"not found", "text/plain")
            except (BrokenPipeError, ConnectionResetError):
                pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

        def handle_error(self, request, client_address) -> None:
            pass

    httpd = Server(sock.getsockname(), Handler, bind_and_activate=False)
    httpd.socket.close()
    httpd.socket = sock
    httpd.serve_forever(poll_interval=0.2)


def make_urls(base: str, n: int, n_images: int, seed: int = 1) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randrange(n_images)
        r = rng.random()
        if r < 0.03:
            path = f"/missing/{i}.jpg"
        elif r < 0.04:
            path = f"/error/{i}.jpg"
        elif r < 0.05:
            path = f"/bad/{i}.jpg"
        elif r < 0.06:
            path = f"/slow/{k}.jpg?i={i}"
        else:
            path = f"/img/{k}.jpg?i={i}"
        rows.append((base + path, f"a photo number {i} of a thing"))
    return rows


# --------------------------------------------------------------------------- CPU accounting
def _proc_cpu(pid: int, with_children: bool) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + ((cutime + cstime) if with_children else 0)) / tick


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants (live ones, plus the reaped ones)."""
    total = _proc_cpu(pid, with_children=True)
    for child in _children(pid):
        total += tree_cpu(child)
    return total


def jvm_pid(spark) -> int:
    return int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())


@dataclass
class CpuSplit:
    """CPU seconds of the driver Python, the JVM itself, and the Python workers under the JVM."""

    driver: float = 0.0
    jvm: float = 0.0
    workers: float = 0.0

    @classmethod
    def now(cls, jvm: int) -> "CpuSplit":
        own = _proc_cpu(jvm, with_children=False)
        return cls(sum(os.times()[:2]), own, tree_cpu(jvm) - own)

    def __sub__(self, other: "CpuSplit") -> "CpuSplit":
        return CpuSplit(self.driver - other.driver, self.jvm - other.jvm, self.workers - other.workers)

    def __add__(self, other: "CpuSplit") -> "CpuSplit":
        return CpuSplit(self.driver + other.driver, self.jvm + other.jvm, self.workers + other.workers)

    @property
    def total(self) -> float:
        return self.driver + self.jvm + self.workers

    def as_dict(self) -> dict:
        return {"driver": round(self.driver, 2), "jvm": round(self.jvm, 2), "workers": round(self.workers, 2),
                "total": round(self.total, 2)}


class PhaseCpu(logging.Handler):
    """Snapshots the CPU split at each `phase` log record of the download job: CPU per phase."""

    def __init__(self, jvm: int) -> None:
        super().__init__()
        self.jvm = jvm
        self.reset()

    def reset(self) -> None:
        self.last = CpuSplit.now(self.jvm)
        self.phases: dict[str, CpuSplit] = {}

    def emit(self, record: logging.LogRecord) -> None:
        phase = getattr(record, "phase", None)
        if phase is None:
            return
        now = CpuSplit.now(self.jvm)
        self.phases[phase] = self.phases.get(phase, CpuSplit()) + (now - self.last)
        self.last = now


def _one_job(spark, cfg, lake, jvm: int, phases: PhaseCpu, job_module: str) -> dict:
    import importlib

    run_download = importlib.import_module(job_module).run_download
    shutil.rmtree(lake.table_path("images"), ignore_errors=True)
    phases.reset()
    cpu0 = CpuSplit.now(jvm)
    started = time.time()
    summary = run_download(spark, cfg, lake)
    wall = time.time() - started
    cpu = CpuSplit.now(jvm) - cpu0
    return {"summary": summary, "wall_s": wall, "cpu": cpu,
            "phases": {k: v.as_dict() for k, v in phases.phases.items()}}


def run_ours(rows: list[tuple[str, str]], args) -> dict:
    """Two runs of the job in one session: the first right after the JVM start (cold), then the
    same job again on a fresh `images` table (warm JIT, Python workers reused)."""
    import datetime as dt

    import mmh3

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from laion_spark.config import Config, DownloadConfig, LakeConfig, SparkConfig
    from laion_spark.lake import Lake
    from laion_spark.spark import build_spark_session

    cold_started = time.time()
    cpu_before_jvm = sum(os.times()[:2])
    spark = build_spark_session(SparkConfig(master=f"local[{args.processes}]", shuffle_partitions=args.processes,
                                            driver_memory="4g", log_level="ERROR", app_name="bench-download"))
    jvm = jvm_pid(spark)
    start_cpu = sum(os.times()[:2]) - cpu_before_jvm + tree_cpu(jvm)
    start_wall = time.time() - cold_started
    lake_root = OUT / "lake"
    shutil.rmtree(lake_root, ignore_errors=True)
    lake = Lake(spark, LakeConfig(root=str(lake_root)))
    when = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
    data = [(mmh3.hash64(u + t)[0], u, t, "http://page/", "en", 0.99, "en", "bench", i, "BENCH", when)
            for i, (u, t) in enumerate(rows)]
    from pyspark.sql import types as T

    schema = T.StructType([T.StructField(n, t) for n, t in [
        ("uid", T.LongType()), ("url", T.StringType()), ("text", T.StringType()), ("page_url", T.StringType()),
        ("language", T.StringType()), ("language_prob", T.DoubleType()), ("language_group", T.StringType()),
        ("source_file", T.StringType()), ("record_offset", T.LongType()), ("crawl", T.StringType()),
        ("fetch_time", T.TimestampType())]])
    lake.append("candidates", spark.createDataFrame(data, schema), stage="bench", units=["urls"])
    cfg = Config()
    n_tasks = args.tasks or 2 * args.processes
    cfg.download = DownloadConfig(
        threads_per_task=args.threads, shard_size=math.ceil(len(rows) / n_tasks),
        max_shards_per_wave=n_tasks, allow_loopback=True, per_host_concurrency=args.threads,
        resize_mode="border", image_size=256, output_format="jpg", encode_quality=95,
        read_timeout_s=10.0, total_deadline_s=20.0, retries=0, decode_workers=args.decode_workers,
        compression=args.compression)
    phases = PhaseCpu(jvm)
    logging.getLogger("laion_spark.download.job").addHandler(phases)
    if args.job_module != "laion_spark.download.job":  # an older job.py, to measure a change
        cfg.download = replace(cfg.download, compression="zstd")
    cold = _one_job(spark, cfg, lake, jvm, phases, args.job_module)
    warm = _one_job(spark, cfg, lake, jvm, phases, args.job_module)
    spark.stop()
    for name, run in (("cold", cold), ("warm", warm)):
        log.info("%s run CPU by process: %s; by phase: %s", name, run["cpu"].as_dict(), run["phases"])
    s = warm["summary"]
    return {"success": s["success"], "rows": s["pending_rows"], "wall_s": warm["wall_s"],
            "cpu_s": warm["cpu"].total, "cpu_split": warm["cpu"].as_dict(), "phases": warm["phases"],
            "cold_wall_s": start_wall + cold["wall_s"], "cold_cpu_s": start_cpu + cold["cpu"].total,
            "cold_cpu_split": cold["cpu"].as_dict(), "cold_phases": cold["phases"],
            "jvm_start_cpu_s": start_cpu, "cold_success": cold["summary"]["success"],
            "errors": s.get("errors"), "job_phases_s": s.get("phases")}


def ensure_peer() -> Path:
    exe = PEER_VENV / "bin" / "img2dataset"
    if not exe.exists():
        log.info("installing img2dataset==%s into %s", IMG2DATASET_VERSION, PEER_VENV)
        subprocess.run([shutil.which("python3") or "python3", "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", f"img2dataset=={IMG2DATASET_VERSION}"],
                       check=True)
    return exe


def run_img2dataset(rows: list[tuple[str, str]], args) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    exe = ensure_peer()
    folder = OUT / "img2dataset"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    url_list = OUT / "urls.parquet"
    pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [t for _, t in rows]}), url_list)
    cmd = [str(exe), "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "parquet", "--output_folder", str(folder / "out"),
           "--processes_count", str(args.processes), "--thread_count", str(args.threads),
           "--image_size", "256", "--resize_mode", "border", "--encode_format", "jpg", "--encode_quality", "95",
           "--number_sample_per_shard", str(math.ceil(len(rows) / (args.tasks or 2 * args.processes))),
           "--timeout", "10", "--retries", "0", "--extract_exif", "False", "--compute_hash", "sha256",
           "--distributor", "multiprocessing", "--enable_wandb", "False"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    wall = time.time() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stats = [json.loads(p.read_text()) for p in (folder / "out").glob("*_stats.json")]
    errors: dict = {}
    for st in stats:
        for k, v in st.get("status_dict", {}).items():
            errors[k] = errors.get(k, 0) + v
    return {"success": sum(st["successes"] for st in stats), "rows": sum(st["count"] for st in stats),
            "wall_s": wall, "cpu_s": cpu, "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=10000)
    parser.add_argument("--images", type=int, default=160, help="distinct images in the corpus")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--server-workers", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=None,
                        help="shards = Spark tasks = img2dataset shards (default 2 x processes)")
    parser.add_argument("--compression", default="snappy", help="Parquet codec of our images table")
    parser.add_argument("--job-module", default="laion_spark.download.job",
                        help="module with run_download (e.g. an older job.py on PYTHONPATH, for before/after)")
    parser.add_argument("--only", choices=["ours", "img2dataset"], default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    images = build_corpus(args.images)
    sizes = sorted(len(b) for b in images)
    log.info("corpus: %d JPEGs, %d..%d bytes (median %d)", len(images), sizes[0], sizes[-1], sizes[len(sizes) // 2])
    pids: list[int] = []
    try:
        # bind here so the port is known before forking the workers
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        port = sock.getsockname()[1]
        for _ in range(args.server_workers):
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
                try:
                    _serve(sock, images)
                finally:
                    os._exit(0)
            pids.append(pid)
        sock.close()
        base = f"http://127.0.0.1:{port}"
        rows = make_urls(base, args.urls, len(images))
        results = {}
        if args.only in (None, "img2dataset"):
            log.info("running img2dataset on %d URLs", len(rows))
            results["img2dataset"] = run_img2dataset(rows, args)
            log.info("img2dataset: %s", results["img2dataset"])
        if args.only in (None, "ours"):
            log.info("running laion-spark download on %d URLs", len(rows))
            results["laion-spark"] = run_ours(rows, args)
            log.info("laion-spark: %s", results["laion-spark"])
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    print(f"\n{args.urls} URLs, {len(images)} distinct JPEGs, local server with {args.server_workers} workers; "
          f"{args.processes} processes x {args.threads} threads; border 256 jpg q95")
    print(f"{'tool':<28}{'success':>9}{'wall s':>9}{'img/s':>9}{'CPU s':>9}{'CPU s/img':>11}{'img/CPU-s':>11}")
    for name, r in results.items():
        print(f"{name:<28}{r['success']:>9}{r['wall_s']:>9.1f}{r['success'] / r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}"
              f"{r['cpu_s'] / max(1, r['success']):>11.4f}{r['success'] / r['cpu_s']:>11.1f}")
        if "cold_cpu_s" in r:
            print(f"{name + ' (cold, JVM start)':<28}{r['success']:>9}{r['cold_wall_s']:>9.1f}"
                  f"{r['success'] / r['cold_wall_s']:>9.1f}{r['cold_cpu_s']:>9.1f}"
                  f"{r['cold_cpu_s'] / max(1, r['success']):>11.4f}{r['success'] / r['cold_cpu_s']:>11.1f}")
    ours = results.get("laion-spark")
    if ours:
        print(f"\nlaion-spark CPU s by process, warm: {ours['cpu_split']}; cold run (JVM start "
              f"{ours['jvm_start_cpu_s']:.1f} s not included): {ours['cold_cpu_split']}")
        for label, key in (("warm", "phases"), ("cold", "cold_phases")):
            for phase, split in ours[key].items():
                print(f"  {label} {phase:<24} {split}")
    if len(results) == 2:
        ours, peer = results["laion-spark"], results["img2dataset"]
        eff = (ours["success"] / ours["cpu_s"]) / (peer["success"] / peer["cpu_s"])
        cold = (ours["success"] / ours["cold_cpu_s"]) / (peer["success"] / peer["cpu_s"])
        speed = (ours["success"] / ours["wall_s"]) / (peer["success"] / peer["wall_s"])
        print(f"\nimages per CPU-second, laion-spark / img2dataset: {eff:.2f}x (cold, with JVM start: {cold:.2f}x)")
        print(f"images per second (wall),  laion-spark / img2dataset: {speed:.2f}x")
        (OUT / "results.json").write_text(json.dumps({"args": vars(args), "results": results,
                                                      "ratio_images_per_cpu_s": eff,
                                                      "ratio_images_per_cpu_s_cold": cold,
                                                      "ratio_images_per_s": speed}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
