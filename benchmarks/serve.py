"""The search service under load on a 1M-vector index, side by side with clip-retrieval's back.

    flock /work/coord/bench.lock .venv/bin/python benchmarks/serve.py --n 1000000 --dim 512 \
        --clip-model /path/demo-clip --out /work/cache/serve-bench

1. Builds two index folders with our index core (`build_local`, no Spark), unless present:
   `emb`: N synthetic clustered L2-normalised vectors of --dim (CLIP B/32's 512 by default),
   for embedding queries; `txt`: N vectors of the CLIP model's own dimension, for text queries
   encoded by that model (a text query must land in the index's space). Both with url/text
   metadata, served memory-mapped (faiss IO_FLAG_MMAP, Arrow IPC).
2. Starts `laion-spark serve` (uvicorn, --workers) on 127.0.0.1 over both; a closed-loop load
   generator on loopback (threads, one keep-alive connection each) at each concurrency: p50/p99
   latency and QPS for embedding and text queries, then the server's RSS (anonymous and
   file-backed pages).
3. clip-retrieval's back (`clip_back`, 2.45.0) over the same two folders (the same image.index
   files and the same Arrow metadata, linked into its layout: `image.index` + `metadata/*.arrow`,
   `use_arrow`, `enable_faiss_memory_mapping`), in its own venv (--clip-venv, made here when
   missing: pip install clip-retrieval, with this interpreter's torch linked in rather than
   downloaded again), measured with the same bodies and the same load generator. The top-10 ids
   of a few queries are compared between the two backs (same index, same nprobe → same ids).
4. Recall@10 of the served index at its nprobe: from recall.json (1,000 held-out queries, exact
   ground truth, written by the build).
Every query body is the same for both backs: `num_images` 10, `deduplicate` and
`use_safety_model` true. Ours then runs its three default filters (safe mode on the punsafe
column, duplicate URLs, near-duplicates on reconstructed vectors); clip back runs its
near-duplicate pass (faiss range search over reconstructed vectors) and no safety filter (its
safety model is a Keras model fetched from the web: not loaded, `provide_safety_model` off).
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


CLIP_BACK_RUNNER = r"""
# Runs clip-retrieval's back (its own code, its own venv) for benchmarks/serve.py. Changes
# only what this machine needs: listen on 127.0.0.1 (clip back binds 0.0.0.0), the build's
# nprobe on each IVF index (clip back keeps the nprobe stored in the file), and the demo
# CLIP's own tokenizer for all_clip's `hf_clip:` loader (which tokenizes with OpenAI's
# 49k-token BPE at 77 positions; the demo CLIP has a 2k vocabulary and 48 positions).
import importlib, json, sys
import faiss, flask
from all_clip import hf_clip
cb = importlib.import_module("clip_retrieval.clip_back")  # the module, not the function
from transformers import AutoTokenizer

args = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(args["clip_dir"])

class _Tokenize:
    @staticmethod
    def tokenize(texts, truncate=True):
        return tok(texts, padding=True, truncation=True, max_length=args["max_tokens"],
                   return_tensors="pt")["input_ids"]

hf_clip.clip = _Tokenize
_load = cb.load_index

def load_index(path, mmap):
    index = _load(path, mmap)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = args["nprobe"][path]
    return index

cb.load_index = load_index
_run = flask.Flask.run
flask.Flask.run = lambda self, host=None, port=None, **kw: _run(self, "127.0.0.1", port, **kw)
cb.clip_back(indices_paths=args["indices_paths"], port=args["port"],
             enable_faiss_memory_mapping=True, use_arrow=True,
             columns_to_return=args["columns"], enable_mclip_option=False, use_jit=False,
             clip_model="hf_clip:" + args["clip_dir"], provide_safety_model=False,
             provide_violence_detector=False, provide_aesthetic_embeddings=False)
"""


def ensure_clip_venv(venv: str, version: str = "2.45.0") -> str:
    """The python of a venv holding clip-retrieval==version; made when missing. torch (a few GB
    with its CUDA wheels) is not downloaded again: this interpreter's torch, nvidia and triton
    packages are linked into a folder the venv reads last (a .pth), and pip is told the same
    torch version, so it takes the linked one."""
    py = os.path.join(venv, "bin", "python")
    if os.path.exists(py) and subprocess.run(
            [py, "-c", "import clip_retrieval.clip_back, all_clip"],
            capture_output=True).returncode == 0:
        return py
    import site

    import torch

    site_dir = next(p for p in site.getsitepackages() if os.path.isdir(os.path.join(p, "torch")))
    link = venv.rstrip("/") + "-torch-link"
    os.makedirs(link, exist_ok=True)
    for name in os.listdir(site_dir):
        if name.split("-")[0].split(".")[0] in ("torch", "torchgen", "functorch", "triton",
                                                  "nvidia", "cuda") or name.startswith(
                ("nvidia_", "cuda_", "torch-", "triton-")):
            dst = os.path.join(link, name)
            if not os.path.lexists(dst):
                os.symlink(os.path.join(site_dir, name), dst)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    sp = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(sp, "zz-linked-torch.pth"), "w") as f:
        f.write(link + "\n")
    torch_version = torch.__version__.split("+")[0]
    log.info("clip venv %s: pip install clip-retrieval==%s torch==%s (linked)", venv, version,
             torch_version)
    # setuptools < 81: clip-anytorch (imported by all_clip) still imports pkg_resources.
    subprocess.run([py, "-m", "pip", "install", "-q", f"clip-retrieval=={version}",
                    f"torch=={torch_version}", "setuptools>=77.0.3,<81"], check=True)
    return py


def clip_back_model(out: str, clip_dir: str) -> str:
    """The demo CLIP as clip back's transformers 4 reads it: the same files linked, but a
    tokenizer_config naming PreTrainedTokenizerFast (ours was saved by transformers 5, whose
    `TokenizersBackend` class transformers 4 does not know; same tokenizer.json)."""
    d = os.path.join(out, "clipback-model")
    os.makedirs(d, exist_ok=True)
    for name in os.listdir(clip_dir):
        src, dst = os.path.join(clip_dir, name), os.path.join(d, name)
        if name == "tokenizer_config.json":
            conf = json.load(open(src))
            conf["tokenizer_class"] = "PreTrainedTokenizerFast"
            with open(dst, "w") as f:
                json.dump(conf, f)
        elif os.path.isfile(src) and not os.path.lexists(dst):
            os.symlink(src, dst)
    return d


def clip_back_layout(out: str, name: str, folder: str) -> str:
    """clip back's folder for one of ours: image.index and metadata/<file>.arrow, linked."""
    d = os.path.join(out, f"clipback-{name}")
    os.makedirs(os.path.join(d, "metadata"), exist_ok=True)
    for src, dst in ((os.path.join(folder, "image.index"), os.path.join(d, "image.index")),
                     (os.path.join(folder, "metadata.arrow"),
                      os.path.join(d, "metadata", "0.arrow"))):
        if not os.path.lexists(dst):
            os.symlink(src, dst)
    return d


def wait_ready(proc: subprocess.Popen, port: int, log_path: str, limit_s: float = 900) -> float:
    t = time.time()
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/indices-list")
            if c.getresponse().status == 200:
                return time.time() - t
        except OSError:
            pass
        if proc.poll() is not None or time.time() - t > limit_s:
            raise RuntimeError(f"server did not start; see {log_path}")
        time.sleep(0.5)


def post(port: int, body: bytes, timeout: float = 120) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", "/knn-service", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def measure(port: int, bodies: dict[str, list[bytes]], concurrency: list[int],
            seconds: float, side: str) -> list[dict]:
    runs = []
    for kind, kb in bodies.items():
        for c in concurrency:
            r = load(port, kb, c, seconds)
            r.update(kind=kind, side=side)
            runs.append(r)
            log.info("%s", r)
    return runs


def in_process_steps(folder_path: str, bodies: list[bytes], warm: int = 50) -> dict:
    """One embedding query end to end without HTTP, p50 ms per step: JSON parse (orjson),
    validation, the search core's own steps (embedding check, knn with reconstruction, filters,
    metadata rows) and the response encoding (orjson). The HTTP p50 at concurrency 1 minus
    `total` is what uvicorn + FastAPI + the thread hop cost."""
    import faiss
    import orjson

    from laion_spark.config import DownloadConfig, ServeConfig
    from laion_spark.serve import search
    from laion_spark.serve.store import open_index_folder

    faiss.omp_set_num_threads(1)  # as in a worker
    folder = open_index_folder("emb", folder_path)
    cfg, dcfg = ServeConfig(), DownloadConfig()
    steps: dict[str, list] = {}
    for k, b in enumerate(bodies):
        t0 = time.perf_counter()
        body = orjson.loads(b)
        t1 = time.perf_counter()
        q = search.parse_query(body, {"emb": folder}, cfg)
        t2 = time.perf_counter()
        r = search.run_search(q, folder, cfg, dcfg)
        t3 = time.perf_counter()
        orjson.dumps(r.rows, option=orjson.OPT_SERIALIZE_NUMPY)
        t4 = time.perf_counter()
        if k < warm:
            continue
        for name, v in (("json_parse", t1 - t0), ("validate", t2 - t1), ("json_encode", t4 - t3),
                        ("total", t4 - t0)):
            steps.setdefault(name, []).append(v * 1000)
        for name, v in r.timings_ms.items():
            if name != "total_ms":
                steps.setdefault(name[:-3], []).append(v)
    return {k: round(float(np.percentile(v, 50)), 3) for k, v in steps.items()}


def top_ids(port: int, bodies: list[bytes]) -> list[list[int]]:
    out = []
    for b in bodies:
        status, data = post(port, b)
        if status != 200:
            raise RuntimeError(f"query answered {status}: {data[:300]!r}")
        out.append([r["id"] for r in json.loads(data)][:10])
    return out


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
    ap.add_argument("--clip-venv", default="/work/cache/venv-clip-retrieval",
                    help="venv for clip-retrieval's back ('' = do not run it)")
    ap.add_argument("--clip-port", type=int, default=18235)
    ap.add_argument("--skip-ours", action="store_true", help="measure clip back only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.makedirs(args.out, exist_ok=True)
    concurrency = [int(x) for x in args.concurrency.split(",")]
    results: dict = {"n": args.n, "dim": args.dim, "workers": args.workers,
                     "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    emb_dir = os.path.join(args.out, f"emb-{args.n}-{args.dim}")
    t = time.time()
    params = build(emb_dir, args.n, args.dim, args.index_key, args.budget_gb, seed=0)
    results["emb_index"] = {k: params["indices"]["image"][k] for k in ("index_key", "nprobe")}
    results["emb_build_s"] = round(time.time() - t, 1)
    recall = json.load(open(os.path.join(emb_dir, "recall.json")))["indices"]["image"]
    results["emb_recall@10"] = recall["image_queries"]["recall@10"]
    results["emb_nn_recall@10"] = recall["image_queries"]["nn_recall@10"]
    folders = {"emb": emb_dir}
    nprobes = {"emb": params["indices"]["image"]["nprobe"]}
    if args.clip_model:
        cfg = json.load(open(os.path.join(args.clip_model, "config.json")))
        tdim = int(cfg.get("projection_dim") or 512)
        tn = args.text_n or args.n
        txt_dir = os.path.join(args.out, f"txt-{tn}-{tdim}")
        tparams = build(txt_dir, tn, tdim, "IVF1024,Flat", args.budget_gb, seed=1)
        nprobes["txt"] = tparams["indices"]["image"]["nprobe"]
        results["txt_index"] = {"rows": tn, "dim": tdim, "nprobe": nprobes["txt"]}
        with open(os.path.join(txt_dir, "model.json"), "w") as f:
            json.dump({"clip_model": args.clip_model, "text_model": None, "dim": tdim}, f)
        folders["txt"] = txt_dir
    # Metadata → Arrow once (the server would do it on first start; timed apart).
    from laion_spark.serve.store import Metadata

    for name, d in folders.items():
        t = time.time()
        Metadata.open(d)
        results.setdefault("arrow_convert_s", {})[name] = round(time.time() - t, 1)
    sizes = {f: os.path.getsize(os.path.join(emb_dir, f)) for f in os.listdir(emb_dir)
             if os.path.isfile(os.path.join(emb_dir, f))}
    results["emb_files_mb"] = {k: round(v / 2 ** 20, 1) for k, v in sizes.items()}

    # The same bodies for both backs (clip back requires modality, indice_name, num_images).
    rng = np.random.default_rng(7)
    q = clustered_vectors(2000, args.dim, n_clusters=1000, seed=0, latent_dim=32)
    q = q + rng.standard_normal(q.shape).astype(np.float32) * 0.02
    common = {"modality": "image", "num_images": 10, "num_result_ids": 10,
              "deduplicate": True, "use_safety_model": True}
    bodies = {"embedding": [json.dumps(dict(common, indice_name="emb", embedding_input=v.tolist(
    ))).encode() for v in q]}
    if "txt" in folders:
        words = np.array(WORDS)
        bodies["text"] = [json.dumps(dict(common, indice_name="txt", text=" ".join(
            words[rng.integers(0, len(WORDS), 4)]))).encode() for _ in range(500)]
    probe = {k: v[:20] for k, v in bodies.items()}
    results["in_process_p50_ms"] = in_process_steps(emb_dir, bodies["embedding"][:550])
    log.info("in-process steps, p50 ms: %s", results["in_process_p50_ms"])
    ids: dict = {}
    runs: list = []
    env = dict(os.environ, PYTHONPATH=str(REPO))

    if not args.skip_ours:
        cmd = [sys.executable, "-m", "laion_spark.cli", "serve", "--port", str(args.port),
               "--workers", str(args.workers)]
        for name, d in folders.items():
            cmd += ["--index", f"{name}={d}"]
        log_path = os.path.join(args.out, "server.log")
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(log_path, "w"))
        try:
            started = wait_ready(server, args.port, log_path)
            time.sleep(3)  # let every worker finish its start
            results["server_start_s"] = round(started + 3, 1)
            results["rss_idle"] = rss(children(server.pid))
            ids["ours"] = {k: top_ids(args.port, v) for k, v in probe.items()}
            runs += measure(args.port, bodies, concurrency, args.seconds, "ours")
            results["rss_after"] = rss(children(server.pid))
            big = json.dumps(dict(common, indice_name="emb", embedding_input=q[0].tolist(),
                                  num_images=10000, num_result_ids=10000)).encode()
            lat = []
            for _ in range(5):
                t = time.perf_counter()
                status, data = post(args.port, big)
                n_rows = len(json.loads(data))
                lat.append((time.perf_counter() - t) * 1000)
            results["large_k_10000"] = {"rows": n_rows,
                                        "p50_ms": round(float(np.median(lat)), 1)}
        finally:
            server.terminate()
            server.wait(timeout=60)

    if args.clip_venv:
        t = time.time()
        try:
            py = ensure_clip_venv(args.clip_venv)
        except (subprocess.CalledProcessError, OSError) as exc:
            results["clip_back_error"] = f"venv: {exc}"
            py = None
        results["clip_venv_s"] = round(time.time() - t, 1)
        if py and not args.clip_model:
            results["clip_back_error"] = "clip back loads a CLIP model at start: give --clip-model"
        elif py:
            layout = {name: clip_back_layout(args.out, name, d) for name, d in folders.items()}
            paths = os.path.join(args.out, "clip_back_indices.json")
            with open(paths, "w") as f:
                json.dump(layout, f)
            runner = os.path.join(args.out, "clip_back_runner.py")
            with open(runner, "w") as f:
                f.write(CLIP_BACK_RUNNER)
            spec = {"indices_paths": paths, "port": args.clip_port,
                    "clip_dir": clip_back_model(args.out, args.clip_model), "max_tokens": 48 if not args.clip_model
                    else int(json.load(open(os.path.join(args.clip_model, "config.json")))
                             ["text_config"].get("max_position_embeddings", 77)),
                    "nprobe": {os.path.join(layout[n], "image.index"): nprobes[n]
                               for n in layout},
                    "columns": ["url", "text", "similarity", "punsafe", "pwatermark", "width",
                                "height", "uid"]}
            log_path = os.path.join(args.out, "clip_back.log")
            t = time.time()
            clip = subprocess.Popen([py, runner, json.dumps(spec)], stdout=subprocess.DEVNULL,
                                    stderr=open(log_path, "w"),
                                    env={k: v for k, v in os.environ.items()
                                         if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
            try:
                results["clip_back_start_s"] = round(wait_ready(clip, args.clip_port, log_path),
                                                     1)
                results["clip_back_rss_idle"] = rss(children(clip.pid))
                ids["clip_back"] = {k: top_ids(args.clip_port, v) for k, v in probe.items()}
                runs += measure(args.clip_port, bodies, concurrency, args.seconds, "clip_back")
                results["clip_back_rss_after"] = rss(children(clip.pid))
            except RuntimeError as exc:
                results["clip_back_error"] = str(exc) + ": " + open(log_path).read()[-2000:]
            finally:
                clip.terminate()
                clip.wait(timeout=60)
    if "ours" in ids and "clip_back" in ids:
        results["top10_same_ids"] = {
            k: round(float(np.mean([len(set(a) & set(b)) / max(1, len(a)) for a, b in zip(
                ids["ours"][k], ids["clip_back"][k])])), 3) for k in ids["ours"]}
    results["runs"] = runs
    results["loadavg_after"] = os.getloadavg()
    out = os.path.join(args.out, "results.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    print("\n| back | queries | concurrency | p50 ms | p99 ms | QPS | errors |\n"
          "|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['side']} | {r['kind']} | {r['concurrency']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['qps']} | {r['errors']} |")


if __name__ == "__main__":
    main()
