"""The search service under load on a 1M-vector index, one run.

    .venv/bin/python benchmarks/serve.py --n 1000000 --dim 512 --clip-model /path/demo-clip

1. Builds two index folders with our index core (`build_local`, no Spark), unless present:
   `emb`: N synthetic clustered L2-normalised vectors of --dim (CLIP B/32's 512 by default),
   for embedding queries; `txt`: N vectors of the CLIP model's own dimension, for text queries
   encoded by that model (a text query must land in the index's space). Both with url/text
   metadata, served memory-mapped (faiss IO_FLAG_MMAP, Arrow IPC).
2. Starts `laion-spark serve` (uvicorn, --workers) on 127.0.0.1 over both.
3. Load generator on loopback (threads, one keep-alive connection each) at each concurrency:
   p50/p99 latency and QPS for embedding queries and text queries (num_images 10, server
   filters on: safe mode, duplicate URLs, near-duplicates), then the server's RSS split into
   anonymous memory and file-backed (mmapped) pages.
4. Recall@10 of the served index at its nprobe: from recall.json (1,000 held-out queries,
   exact ground truth, written by the build).
clip-retrieval's back is not installed here (its back needs torch + open_clip + autokeras/TF
deps in its own venv, not built in this run); its published figures (README: mean 0.189 s per
query over 20 calls, knn 26.7 ms) are the comparison, stated as such.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from laion_spark.config import IndexConfig  # noqa: E402
from laion_spark.index.build import build_local  # noqa: E402
from laion_spark.index.core import encode_embeddings  # noqa: E402
from laion_spark.index.synthetic import clustered_vectors  # noqa: E402

log = logging.getLogger("bench.serve")
WORDS = ["red", "blue", "green", "circle", "square", "star", "ring", "on", "a", "white",
         "black", "grey", "three", "two", "one", "beige", "yellow", "cross"]


def build(out: str, n: int, dim: int, key: str, budget_gb: float, seed: int) -> dict:
    if os.path.exists(os.path.join(out, "recall.json")):
        log.info("reusing %s", out)
        return json.load(open(os.path.join(out, "index_params.json")))
    t = time.time()
    x = clustered_vectors(n, dim, n_clusters=1000, seed=seed, latent_dim=32)
    rng = np.random.default_rng(seed)
    words = np.array(WORDS, dtype=object)
    pick = words[rng.integers(0, len(WORDS), (n, 5))]
    texts = (pick[:, 0] + " " + pick[:, 1] + " " + pick[:, 2] + " " + pick[:, 3] + " "
             + pick[:, 4]).tolist()
    table = pa.table({
        "uid": pa.array(np.arange(n, dtype=np.int64) + 10 ** 12),
        "url": [f"http://img.example/{seed}/{i}.jpg" for i in range(n)],
        "text": texts,
        "image_embedding": encode_embeddings(x),
        "similarity": pa.array(rng.uniform(0.25, 0.45, n).astype(np.float32)),
        "punsafe": pa.array(rng.uniform(0, 0.6, n).astype(np.float32)),
        "pwatermark": pa.array(rng.uniform(0, 1, n).astype(np.float32)),
    })
    del x
    log.info("%s: %d × %d vectors made in %.0fs", out, n, dim, time.time() - t)
    icfg = IndexConfig(memory_budget_gb=budget_gb, index_key=key or None, recall_queries=1000,
                       latency_target_ms=5.0)
    summary = build_local(table, out, icfg, n_parts=4, modalities=("image",))
    log.info("%s built: %s", out, summary)
    return json.load(open(os.path.join(out, "index_params.json")))


def rss(pids: list[int]) -> dict:
    out = {"anon_mb": 0.0, "file_mb": 0.0, "processes": len(pids)}
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("RssAnon:"):
                    out["anon_mb"] += int(line.split()[1]) / 1024
                elif line.startswith("RssFile:"):
                    out["file_mb"] += int(line.split()[1]) / 1024
        except FileNotFoundError:
            pass
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


def children(pid: int) -> list[int]:
    out = [pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if int(open(f"/proc/{p}/stat").read().split(")")[1].split()[1]) == pid:
                    out.append(int(p))
            except (FileNotFoundError, IndexError, ValueError):
                pass
    return out


def load(port: int, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` threads, each with its own keep-alive connection, for about
    `seconds`; latencies of every answered request."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = k
        mine = []
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            i += concurrency
            t = time.perf_counter()
            conn.request("POST", "/knn-service", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                with lock:
                    errors[0] += 1
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            lat.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - started
    a = np.array(lat) * 1000
    return {"concurrency": concurrency, "requests": len(a), "errors": errors[0],
            "qps": round(len(a) / wall, 1), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--index-key", default="IVF1024,SQ8",
                    help="forced faiss key for the embedding index ('' = budget rule)")
    ap.add_argument("--budget-gb", type=float, default=1.0)
    ap.add_argument("--text-n", type=int, default=None,
                    help="rows of the text-query index (default: --n)")
    ap.add_argument("--clip-model", default=os.environ.get("LAION_SPARK_TEST_DEMO_CLIP"))
    ap.add_argument("--out", default="/tmp/laion-serve-bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--port", type=int, default=18234)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.makedirs(args.out, exist_ok=True)
    load_before = os.getloadavg()
    results: dict = {"n": args.n, "dim": args.dim, "workers": args.workers,
                     "cpus": os.cpu_count(), "loadavg_before": load_before}
    emb_dir = os.path.join(args.out, f"emb-{args.n}-{args.dim}")
    t = time.time()
    params = build(emb_dir, args.n, args.dim, args.index_key, args.budget_gb, seed=0)
    results["emb_index"] = {k: params["indices"]["image"][k] for k in ("index_key", "nprobe")}
    results["emb_build_s"] = round(time.time() - t, 1)
    recall = json.load(open(os.path.join(emb_dir, "recall.json")))["indices"]["image"]
    results["emb_recall@10"] = recall["image_queries"]["recall@10"]
    results["emb_nn_recall@10"] = recall["image_queries"]["nn_recall@10"]
    sizes = {f: os.path.getsize(os.path.join(emb_dir, f)) for f in os.listdir(emb_dir)
             if os.path.isfile(os.path.join(emb_dir, f))}
    indices = [f"emb={emb_dir}"]
    txt_dir = None
    if args.clip_model:
        cfg = json.load(open(os.path.join(args.clip_model, "config.json")))
        tdim = int(cfg.get("projection_dim") or 512)
        tn = args.text_n or args.n
        txt_dir = os.path.join(args.out, f"txt-{tn}-{tdim}")
        build(txt_dir, tn, tdim, "IVF1024,Flat", args.budget_gb, seed=1)
        results["txt_index_rows"] = tn
        with open(os.path.join(txt_dir, "model.json"), "w") as f:
            json.dump({"clip_model": args.clip_model, "text_model": None, "dim": tdim}, f)
        indices.append(f"txt={txt_dir}")
    # Metadata → Arrow once (the server would do it on first start; timed apart).
    from laion_spark.serve.store import Metadata

    for d in (emb_dir, txt_dir):
        if d:
            t = time.time()
            Metadata.open(d)
            results.setdefault("arrow_convert_s", {})[os.path.basename(d)] = round(
                time.time() - t, 1)
    sizes = {f: os.path.getsize(os.path.join(emb_dir, f)) for f in os.listdir(emb_dir)
             if os.path.isfile(os.path.join(emb_dir, f))}
    results["emb_files_mb"] = {k: round(v / 2 ** 20, 1) for k, v in sizes.items()}

    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "laion_spark.cli", "serve", "--port", str(args.port),
           "--workers", str(args.workers)]
    for i in indices:
        cmd += ["--index", i]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(args.out, "server.log"), "w"))
    try:
        t = time.time()
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", args.port, timeout=2)
                c.request("GET", "/indices-list")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() - t > 600:
                raise RuntimeError("server did not start; see server.log")
            time.sleep(0.5)
        time.sleep(3)  # let every worker finish its start
        results["server_start_s"] = round(time.time() - t, 1)
        pids = children(server.pid)
        results["rss_idle"] = rss(pids)
        rng = np.random.default_rng(7)
        q = clustered_vectors(2000, args.dim, n_clusters=1000, seed=0, latent_dim=32)
        q = q + rng.standard_normal(q.shape).astype(np.float32) * 0.02
        emb_bodies = [json.dumps({"indice_name": "emb", "embedding_input": v.tolist(),
                                  "num_images": 10}).encode() for v in q]
        runs = []
        for c in [int(x) for x in args.concurrency.split(",")]:
            r = load(args.port, emb_bodies, c, args.seconds)
            r["kind"] = "embedding"
            runs.append(r)
            log.info("%s", r)
        if txt_dir:
            words = np.array(WORDS)
            text_bodies = [json.dumps({"indice_name": "txt", "text": " ".join(
                words[rng.integers(0, len(WORDS), 4)]), "num_images": 10,
                "modality": "image"}).encode() for _ in range(500)]
            for c in [int(x) for x in args.concurrency.split(",")]:
                r = load(args.port, text_bodies, c, args.seconds)
                r["kind"] = "text"
                runs.append(r)
                log.info("%s", r)
        results["runs"] = runs
        results["rss_after"] = rss(children(server.pid))
        big = json.dumps({"indice_name": "emb", "embedding_input": q[0].tolist(),
                          "num_images": 10000, "num_result_ids": 10000}).encode()
        lat = []
        for _ in range(5):
            c = http.client.HTTPConnection("127.0.0.1", args.port, timeout=120)
            t = time.perf_counter()
            c.request("POST", "/knn-service", big, {"Content-Type": "application/json"})
            resp = c.getresponse()
            n_rows = len(json.loads(resp.read()))
            lat.append((time.perf_counter() - t) * 1000)
        results["large_k_10000"] = {"rows": n_rows, "p50_ms": round(float(np.median(lat)), 1)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    results["loadavg_after"] = os.getloadavg()
    out = os.path.join(args.out, "results.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    print("\n| queries | concurrency | p50 ms | p99 ms | QPS |\n|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['kind']} | {r['concurrency']} | {r['p50_ms']} | {r['p99_ms']} | {r['qps']} |")


if __name__ == "__main__":
    main()
