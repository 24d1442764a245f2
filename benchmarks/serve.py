"""The search service under load on a 1M-vector index, side by side with clip-retrieval's back.

    flock /work/coord/bench.lock .venv/bin/python benchmarks/serve.py --n 1000000 --dim 512 \
        --clip-model /path/demo-clip --out /work/cache/serve-bench

1. Builds two index folders with our index core (`build_local`, no Spark), unless present:
   `emb`: N synthetic clustered L2-normalised vectors of --dim (CLIP B/32's 512 by default),
   for embedding queries; `txt`: N vectors of the CLIP model's own dimension, for text queries
   encoded by that model (a text query must land in the index's space). Both with url/text
   metadata, served memory-mapped (faiss IO_FLAG_MMAP, Arrow IPC).
2. Tunes the served nprobe once per index (kept next to it): the smallest power of two whose
   recall@10 against exact search reaches --target-recall (0.95) on held-out queries (vectors
   drawn like the load's, not indexed, not sent in the load; for the text index the demo CLIP's
   embeddings of held-out query strings). Exact top-10 from the index's own vectors, made again
   from the build's seed. Written to index_params.json (`nprobe`; the build's as
   `build_nprobe`) and recall.json (`serve_tuning`); both backs then search at it.
3. Starts `laion-spark serve` (uvicorn, --workers) on 127.0.0.1 over both; a closed-loop load
   generator on loopback at each concurrency: p50/p99 latency and QPS for embedding and text
   queries, the server's CPU per request (from /proc) and the generator's own CPU share; then
   the server's RSS. Generator: `wrk` (one thread, a Lua script posting the bodies) when
   installed, else a lean asyncio one; the first thread-per-connection generator is run once at
   c=1 and 8 to record what it cost.
4. clip-retrieval's back (`clip_back`, 2.45.0) over the same two folders (the same image.index
   files and the same Arrow metadata, linked into its layout: `image.index` + `metadata/*.arrow`,
   `use_arrow`, `enable_faiss_memory_mapping`), in its own venv (--clip-venv, made here when
   missing: pip install clip-retrieval, with this interpreter's torch linked in rather than
   downloaded again), measured with the same bodies and the same load generator. The top-10 ids
   of a few queries are compared between the two backs (same index, same nprobe → same ids).
5. When the tuned nprobe is not 8, both backs again at nprobe 8 (embedding queries): the
   earlier figures' setting.
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
import shutil
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


def proc_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds so far of these processes (from /proc, clock ticks)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (FileNotFoundError, IndexError, ValueError):
            pass
    return total / tick


def _summary(lat_s: list, wall: float, errors: int, concurrency: int, cpu_s: float) -> dict:
    a = np.array(lat_s) * 1000
    n = len(a)
    return {"concurrency": concurrency, "requests": n, "errors": errors,
            "qps": round(n / wall, 1), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2),
            "gen_cpu_ms_per_req": round(cpu_s * 1000 / max(1, n), 3),
            "gen_cpu_share": round(cpu_s / wall / (os.cpu_count() or 1), 3)}


def load_threads(port: int, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    """The first generator (kept to measure what it cost): `concurrency` threads, each with its
    own keep-alive http.client connection, for about `seconds`."""
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

    cpu0 = time.process_time()
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - started
    return _summary(lat, wall, errors[0], concurrency, time.process_time() - cpu0)


def _requests(port: int, bodies: list[bytes]) -> list[bytes]:
    return [(f"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
             f"Content-Type: application/json\r\nContent-Length: {len(b)}\r\n\r\n").encode()
            + b for b in bodies]


def load_lean(port: int, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    """A lean closed loop in one thread (asyncio): `concurrency` keep-alive connections, request
    bytes encoded beforehand, each answer read as its header block then exactly Content-Length
    bytes. Its own CPU is measured (process_time) and reported."""
    import asyncio

    reqs = _requests(port, bodies)
    lat: list[float] = []
    errors = [0]

    async def conn(k: int, stop: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            writer.write(reqs[i % len(reqs)])
            i += concurrency
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if head[9:12] != b"200":
                errors[0] += 1
            lat.append(time.perf_counter() - t)
        writer.close()

    async def main() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(conn(k, started + seconds) for k in range(concurrency)))
        return time.perf_counter() - started

    cpu0 = time.process_time()
    wall = asyncio.run(main())
    return _summary(lat, wall, errors[0], concurrency, time.process_time() - cpu0)


WRK_LUA = r"""
-- benchmarks/serve.py: POST the bodies of WRK_BODIES (one JSON a line) in turn, each request
-- formatted once at start; done() prints one JSON line the script parses.
local reqs, i = {}, 0
function init(args)
  for line in io.lines(os.getenv("WRK_BODIES")) do
    reqs[#reqs + 1] = wrk.format("POST", "/knn-service", {["Content-Type"] = "application/json"}, line)
  end
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "status_errors": %d, ' ..
    '"socket_errors": %d, "p50_us": %d, "p99_us": %d}\n', summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout, latency:percentile(50),
    latency:percentile(99)))
end
"""


def load_wrk(port: int, bodies: list[bytes], concurrency: int, seconds: float,
             workdir: str) -> dict:
    """wrk (C, one thread, an event loop over `concurrency` keep-alive connections), with a Lua
    script for the POST bodies; its CPU from its rusage."""
    lua = os.path.join(workdir, "wrk_bodies.lua")
    with open(lua, "w") as f:
        f.write(WRK_LUA)
    path = os.path.join(workdir, "wrk_bodies.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(bodies) + b"\n")
    proc = subprocess.Popen(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
                             "--timeout", "60s", "-s", lua, f"http://127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, WRK_BODIES=path))
    out = proc.stdout.read().decode()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out[-1000:]}")
    w = json.loads(line[8:])
    wall = w["duration_us"] / 1e6
    cpu = ru.ru_utime + ru.ru_stime
    n = w["requests"]
    return {"concurrency": concurrency, "requests": n,
            "errors": w["status_errors"] + w["socket_errors"], "qps": round(n / wall, 1),
            "p50_ms": round(w["p50_us"] / 1000, 2), "p99_ms": round(w["p99_us"] / 1000, 2),
            "gen_cpu_ms_per_req": round(cpu * 1000 / max(1, n), 3),
            "gen_cpu_share": round(cpu / wall / (os.cpu_count() or 1), 3)}


def load(port: int, bodies: list[bytes], concurrency: int, seconds: float, generator: str,
         server_pids: list[int], workdir: str) -> dict:
    """One closed-loop point with the chosen generator, plus the server's CPU per request and
    its share of the machine over the same window (from /proc)."""
    cpu0, t0 = proc_cpu_s(server_pids), time.perf_counter()
    if generator == "wrk":
        r = load_wrk(port, bodies, concurrency, seconds, workdir)
    elif generator == "lean":
        r = load_lean(port, bodies, concurrency, seconds)
    else:
        r = load_threads(port, bodies, concurrency, seconds)
    cpu, wall = proc_cpu_s(server_pids) - cpu0, time.perf_counter() - t0
    r["generator"] = generator
    r["server_cpu_ms_per_req"] = round(cpu * 1000 / max(1, r["requests"]), 3)
    r["server_cpu_share"] = round(cpu / wall / (os.cpu_count() or 1), 3)
    return r


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
    """clip back's folder for one of ours: image.index and metadata/*.arrow, linked. Ours has
    one metadata.arrow (converted from the single Parquet) or per-part
    metadata/<first:012d>-<end:012d>.arrow files; clip back concatenates its folder's files in
    sorted name order, which for the zero-padded part names is id order."""
    d = os.path.join(out, f"clipback-{name}")
    os.makedirs(os.path.join(d, "metadata"), exist_ok=True)
    links = [(os.path.join(folder, "image.index"), os.path.join(d, "image.index"))]
    if os.path.exists(os.path.join(folder, "metadata.arrow")):
        links.append((os.path.join(folder, "metadata.arrow"),
                      os.path.join(d, "metadata", "0.arrow")))
    else:
        links += [(os.path.join(folder, "metadata", f), os.path.join(d, "metadata", f))
                  for f in sorted(os.listdir(os.path.join(folder, "metadata")))
                  if f.endswith(".arrow")]
    for src, dst in links:
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
            seconds: float, side: str, generator: str, server_pids: list[int],
            workdir: str, nprobe: dict) -> list[dict]:
    runs = []
    for kind, kb in bodies.items():
        # 3 s of load first, not measured, for both backs alike: the first requests of a fresh
        # server map the index's pages into each worker and warm its caches
        load(port, kb, 8, 3, generator, server_pids, workdir)
        for c in concurrency:
            r = load(port, kb, c, seconds, generator, server_pids, workdir)
            r.update(kind=kind, side=side, nprobe=nprobe[{"embedding": "emb",
                                                          "text": "txt"}[kind]])
            runs.append(r)
            log.info("%s", r)
    return runs


def exact_top10(queries: np.ndarray, n: int, dim: int, seed: int, block: int = 100) -> np.ndarray:
    """Exact inner-product top-10 ids over the index's vectors, made again from the build's seed
    (`clustered_vectors` is deterministic) and streamed chunk by chunk: nothing of N × dim held."""
    from laion_spark.index.synthetic import iter_clustered_vectors

    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), 10), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 10), dtype=np.int64)
    for a, _, x in iter_clustered_vectors(n, dim, 1000, seed=seed, latent_dim=32):
        for qa in range(0, len(q), block):
            s = q[qa: qa + block] @ x.T
            top = np.argpartition(-s, 10, axis=1)[:, :10]
            cand_s = np.concatenate([best_s[qa: qa + block],
                                     np.take_along_axis(s, top, axis=1)], axis=1)
            cand_i = np.concatenate([best_i[qa: qa + block], top + a], axis=1)
            keep = np.argsort(-cand_s, axis=1)[:, :10]
            best_s[qa: qa + block] = np.take_along_axis(cand_s, keep, axis=1)
            best_i[qa: qa + block] = np.take_along_axis(cand_i, keep, axis=1)
    return best_i


def tune_served_nprobe(folder: str, n: int, dim: int, seed: int, queries: np.ndarray,
                       query_kind: str, target: float) -> dict:
    """The smallest power-of-two nprobe whose recall@10 (against exact search) reaches `target`
    on held-out queries (autofaiss picks nprobe for a recall the same way), recorded next to the
    index: index_params.json `nprobe` (what the server searches with; the build's latency-rule
    value kept as `build_nprobe`) and `serve_tuning` (the recall curve), also in recall.json."""
    import faiss

    from laion_spark.index.core import recall_at

    pfile = os.path.join(folder, "index_params.json")
    params = json.load(open(pfile))
    img = params["indices"]["image"]
    done = img.get("serve_tuning")
    if done and done["target_recall@10"] == target and done["queries"] == len(queries) and \
            done["query_kind"] == query_kind:
        return done
    t = time.time()
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = exact_top10(q, n, dim, seed)
    index = faiss.read_index(os.path.join(folder, "image.index"),
                             faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    ivf = faiss.extract_index_ivf(index)
    curve, chosen = [], None
    nprobe = 1
    while nprobe <= min(ivf.nlist, 64):
        _, found = index.search(np.ascontiguousarray(q, dtype=np.float32), 10,
                                params=faiss.SearchParametersIVF(nprobe=nprobe))
        r = recall_at(found, truth, 10)
        curve.append({"nprobe": nprobe, "recall@10": round(r, 4)})
        if r >= target and chosen is None:
            chosen = nprobe
        if chosen is not None and nprobe >= max(8, chosen):  # 8: the figures for continuity
            break
        nprobe *= 2
    if max(c["recall@10"] for c in curve) < 0.5:  # vectors made again ≠ the indexed ones
        raise RuntimeError(f"{folder}: exact ids do not match the index (curve {curve})")
    if chosen is None:
        chosen = curve[-1]["nprobe"]
    tuning = {"target_recall@10": target, "queries": len(q), "query_kind": query_kind,
              "nprobe": chosen, "curve": curve, "seconds": round(time.time() - t, 1),
              "rule": "smallest power of two with recall@10 >= target against exact search "
                      "(benchmarks/serve.py)"}
    img.setdefault("build_nprobe", img["nprobe"])
    img["nprobe"] = chosen
    img["serve_tuning"] = tuning
    with open(pfile + ".tmp", "w") as f:
        json.dump(params, f, indent=2)
    os.replace(pfile + ".tmp", pfile)
    rfile = os.path.join(folder, "recall.json")
    rec = json.load(open(rfile))
    rec["indices"]["image"]["serve_tuning"] = tuning
    with open(rfile + ".tmp", "w") as f:
        json.dump(rec, f, indent=2)
    os.replace(rfile + ".tmp", rfile)
    log.info("%s: served nprobe %d (%s)", folder, chosen, curve)
    return tuning


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
    ap.add_argument("--generator", choices=["wrk", "lean", "threads"], default=None,
                    help="load generator (default: wrk when installed, else the lean asyncio one)")
    ap.add_argument("--target-recall", type=float, default=0.95,
                    help="served nprobe: the smallest with recall@10 >= this (held-out queries)")
    ap.add_argument("--tune-queries", type=int, default=300)
    ap.add_argument("--continuity-nprobe", type=int, default=8,
                    help="embedding queries also at this nprobe (the earlier figures)")
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
    # The last --tune-queries vectors / strings tune nprobe; the others are the load's bodies.
    nt = args.tune_queries
    bodies = {"embedding": [json.dumps(dict(common, indice_name="emb", embedding_input=v.tolist(
    ))).encode() for v in q[:-nt]]}
    words = np.array(WORDS)
    texts = [" ".join(words[rng.integers(0, len(WORDS), 4)]) for _ in range(500 + nt)]
    if "txt" in folders:
        bodies["text"] = [json.dumps(dict(common, indice_name="txt", text=t)).encode()
                          for t in texts[:500]]
    probe = {k: v[:20] for k, v in bodies.items()}

    # The served nprobe: the smallest reaching --target-recall on held-out queries (once, kept
    # next to the index); both backs then search at it.
    t_q = q[-nt:]  # not indexed, not sent in the load below
    results["emb_tuning"] = tune_served_nprobe(emb_dir, args.n, args.dim, 0, t_q, "embedding",
                                               args.target_recall)
    if "txt" in folders:
        from laion_spark.serve.encoders import get_encoder

        enc = get_encoder(args.clip_model, None, "cpu")
        t_t = np.stack([enc.embed_text(x) for x in texts[500:]])
        results["txt_tuning"] = tune_served_nprobe(
            folders["txt"], args.text_n or args.n, t_t.shape[1], 1, t_t,
            "text (demo CLIP, the bench's own query strings)", args.target_recall)
    nprobes = {n: json.load(open(os.path.join(d, "index_params.json")))["indices"]["image"][
        "nprobe"] for n, d in folders.items()}
    results["served_nprobe"] = nprobes
    results["in_process_p50_ms"] = in_process_steps(emb_dir, bodies["embedding"][:550])
    log.info("in-process steps, p50 ms: %s", results["in_process_p50_ms"])
    generator = args.generator or ("wrk" if shutil.which("wrk") else "lean")
    results["generator"] = generator
    ids: dict = {}
    runs: list = []
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # Pass "tuned": both kinds at the served nprobe. Pass "nprobe8": embedding queries at the
    # build's nprobe 8 (the earlier figures), when the tuned one differs.
    passes = [("tuned", nprobes, bodies)]
    if nprobes["emb"] != args.continuity_nprobe:
        passes.append((f"nprobe{args.continuity_nprobe}",
                       dict(nprobes, emb=args.continuity_nprobe),
                       {"embedding": bodies["embedding"]}))

    for pass_name, np_pass, pass_bodies in passes:
        if args.skip_ours:
            break
        cmd = [sys.executable, "-m", "laion_spark.cli", "serve", "--port", str(args.port),
               "--workers", str(args.workers)]
        if np_pass != nprobes:
            cmd += ["--set", f"serve.nprobe={np_pass['emb']}"]
        for name, d in folders.items():
            if name == "emb" or pass_name == "tuned":  # the nprobe8 pass: embedding only
                cmd += ["--index", f"{name}={d}"]
        log_path = os.path.join(args.out, "server.log")
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(log_path, "w"))
        try:
            started = wait_ready(server, args.port, log_path)
            time.sleep(3)  # let every worker finish its start
            pids = children(server.pid)
            if pass_name == "tuned":
                results["server_start_s"] = round(started + 3, 1)
                results["rss_idle"] = rss(pids)
                results["server_processes"] = {
                    str(p): open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:120]
                    for p in pids}
                ids["ours"] = {k: top_ids(args.port, v) for k, v in probe.items()}
                if generator != "threads":  # what the first generator cost, for the record
                    for c in (1, 8):
                        r = load(args.port, bodies["embedding"], c, min(args.seconds, 8),
                                 "threads", pids, args.out)
                        r.update(kind="embedding", side="ours", nprobe=np_pass["emb"],
                                 pass_name="generator_check")
                        results.setdefault("threads_generator_check", []).append(r)
                        log.info("threads generator: %s", r)
            for r in measure(args.port, pass_bodies, concurrency, args.seconds, "ours",
                             generator, pids, args.out, np_pass):
                r["pass_name"] = pass_name
                runs.append(r)
            if pass_name == "tuned":
                results["rss_after"] = rss(pids)
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

    py = None
    if args.clip_venv:
        t = time.time()
        try:
            py = ensure_clip_venv(args.clip_venv)
        except (subprocess.CalledProcessError, OSError) as exc:
            results["clip_back_error"] = f"venv: {exc}"
        results["clip_venv_s"] = round(time.time() - t, 1)
        if py and not args.clip_model:
            results["clip_back_error"] = "clip back loads a CLIP model at start: give --clip-model"
            py = None
    for pass_name, np_pass, pass_bodies in passes if py else []:
        layout = {name: clip_back_layout(args.out, name, d) for name, d in folders.items()}
        paths = os.path.join(args.out, "clip_back_indices.json")
        with open(paths, "w") as f:
            json.dump(layout, f)
        runner = os.path.join(args.out, "clip_back_runner.py")
        with open(runner, "w") as f:
            f.write(CLIP_BACK_RUNNER)
        cfg = json.load(open(os.path.join(args.clip_model, "config.json")))
        spec = {"indices_paths": paths, "port": args.clip_port,
                "clip_dir": clip_back_model(args.out, args.clip_model),
                "max_tokens": int(cfg["text_config"].get("max_position_embeddings", 77)),
                "nprobe": {os.path.join(layout[n], "image.index"): np_pass[n] for n in layout},
                "columns": ["url", "text", "similarity", "punsafe", "pwatermark", "width",
                            "height", "uid"]}
        log_path = os.path.join(args.out, "clip_back.log")
        clip = subprocess.Popen([py, runner, json.dumps(spec)], stdout=subprocess.DEVNULL,
                                stderr=open(log_path, "w"),
                                env={k: v for k, v in os.environ.items()
                                     if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
        try:
            start_s = round(wait_ready(clip, args.clip_port, log_path), 1)
            pids = children(clip.pid)
            if pass_name == "tuned":
                results["clip_back_start_s"] = start_s
                results["clip_back_rss_idle"] = rss(pids)
                ids["clip_back"] = {k: top_ids(args.clip_port, v) for k, v in probe.items()}
            for r in measure(args.clip_port, pass_bodies, concurrency, args.seconds,
                             "clip_back", generator, pids, args.out, np_pass):
                r["pass_name"] = pass_name
                runs.append(r)
            if pass_name == "tuned":
                results["clip_back_rss_after"] = rss(pids)
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
    print("\n| pass | queries | c | nprobe | ours p50 / p99 ms | ours QPS | clip back p50 / p99 ms "
          "| clip back QPS | ratio | server CPU ms/req ours / clip | generator CPU share "
          "ours / clip | errors |\n" + "|---" * 12 + "|")
    by = {(r["pass_name"], r["kind"], r["concurrency"], r["side"]): r for r in runs}
    for (pn, kind, c, side), r in by.items():
        if side != "ours":
            continue
        o, k = r, by.get((pn, kind, c, "clip_back"))
        kq = f"{k['p50_ms']} / {k['p99_ms']}" if k else "-"
        print(f"| {pn} | {kind} | {c} | {o['nprobe']} | {o['p50_ms']} / {o['p99_ms']} | "
              f"{o['qps']} | {kq} | {k['qps'] if k else '-'} | "
              f"{round(o['qps'] / k['qps'], 1) if k else '-'}x | "
              f"{o['server_cpu_ms_per_req']} / {k['server_cpu_ms_per_req'] if k else '-'} | "
              f"{o['gen_cpu_share']} / {k['gen_cpu_share'] if k else '-'} | "
              f"{o['errors']} / {k['errors'] if k else '-'} |")

if __name__ == "__main__":
    main()
