"""The HTTP layer: clip-retrieval's back API (`/knn-service`, `/metadata`, `/indices-list`,
`/metrics`) so its ClipClient and its web front work unchanged, ours under `/api/`, and the web
page at `/`. Each uvicorn worker process builds this app once: indices memory-mapped, encoders
loaded at start, so no query pays a model load.

Why bodies are parsed by hand: clip-retrieval's front posts JSON as `text/plain` (a `fetch` with
a string body), which FastAPI's JSON body binding would refuse; and a malformed or oversized body
must be a clear 4xx, never a 500.
"""
from __future__ import annotations

import asyncio
import bisect
import io
import itertools
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
import orjson
import pyarrow as pa
from fastapi import Request

from laion_spark.config import DownloadConfig, ServeConfig
from laion_spark.serve import encoders, search
from laion_spark.serve.encoders import QueryError
from laion_spark.serve.spec import SPEC_ENV, ServeSpec
from laion_spark.serve.store import IndexFolder, open_index_folder

log = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


# ----------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus text exposition, no dependency: request counters and step latency histograms.
    Per worker process (a scrape reaches one worker; the `pid` label tells them apart)."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.hist: dict[str, list] = {}
        self.removed: dict[str, int] = {}

    def request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def observe(self, step: str, seconds: float) -> None:
        i = bisect.bisect_left(self.BUCKETS, seconds)  # its own bucket; render() accumulates
        with self.lock:
            h = self.hist.setdefault(step, [[0] * (len(self.BUCKETS) + 1), 0, 0.0])
            h[0][i] += 1
            h[1] += 1
            h[2] += seconds

    def count_removed(self, removed: dict) -> None:
        with self.lock:
            for k, v in removed.items():
                self.removed[k] = self.removed.get(k, 0) + int(v)

    def render(self) -> str:
        pid = os.getpid()
        lines = ["# HELP laion_serve_requests_total HTTP requests by path and status",
                 "# TYPE laion_serve_requests_total counter"]
        with self.lock:
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'laion_serve_requests_total{{path="{path}",status="{status}",'
                             f'pid="{pid}"}} {n}')
            lines += ["# HELP laion_serve_step_seconds time per step of a search",
                      "# TYPE laion_serve_step_seconds histogram"]
            for step, (counts, n, total) in sorted(self.hist.items()):
                for b, c in zip(self.BUCKETS, itertools.accumulate(counts)):
                    lines.append(f'laion_serve_step_seconds_bucket{{step="{step}",le="{b}",'
                                 f'pid="{pid}"}} {c}')
                lines.append(f'laion_serve_step_seconds_bucket{{step="{step}",le="+Inf",'
                             f'pid="{pid}"}} {n}')
                lines.append(f'laion_serve_step_seconds_count{{step="{step}",pid="{pid}"}} {n}')
                lines.append(f'laion_serve_step_seconds_sum{{step="{step}",pid="{pid}"}} '
                             f'{total:.6f}')
            lines += ["# HELP laion_serve_filtered_total results removed by each filter",
                      "# TYPE laion_serve_filtered_total counter"]
            for k, v in sorted(self.removed.items()):
                lines.append(f'laion_serve_filtered_total{{filter="{k}",pid="{pid}"}} {v}')
        return "\n".join(lines) + "\n"


class CountRequests:
    """Pure ASGI middleware: requests by path and status, the search paths' wall time. Not
    Starlette's `@app.middleware("http")` (BaseHTTPMiddleware), which runs each response through
    an extra task and memory stream: a fixed cost on every query that this skips."""

    TIMED = {"/knn-service": "http_knn_service", "/metadata": "http_metadata",
             "/api/search": "http_api_search"}

    def __init__(self, app, metrics: "Metrics"):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            path = "/api/image" if path.startswith("/api/image/") else path
            if not path.startswith("/static"):
                self.metrics.request(path, status[0])
            if path in self.TIMED:
                self.metrics.observe(self.TIMED[path], time.perf_counter() - started)


def parse_json_body(raw: bytes, max_values: int = ServeConfig.max_json_values) -> Any:
    """A request body as JSON (orjson; Python's json as a fallback, which reads NaN/Infinity so
    the field check can name them); QueryError when empty, malformed, or holding more than
    `max_values` values: commas and opening brackets, counted before parsing (in C, ~10 ms for
    16 MB), because a body of small values costs ~40x its size in Python objects."""
    if not raw.strip():
        raise QueryError("bad_json", "empty body: send a JSON object")
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if values > max_values:
        raise QueryError("too_many_values", f"body holds about {values} JSON values, at most "
                         f"{max_values}", 413)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            body = json.loads(raw)
            # orjson refuses a lone UTF-16 surrogate ("\\ud800"), Python's json reads it into a
            # str that no tokenizer or URL parser can encode: refused here for every field.
            json.dumps(body, ensure_ascii=False).encode("utf-8")
            return body
        except UnicodeEncodeError:
            raise QueryError("bad_json", "a string holds a lone UTF-16 surrogate (such as "
                             "\\ud800): not valid Unicode") from exc
        except (ValueError, RecursionError):
            raise QueryError("bad_json", f"body is not valid JSON: {exc}") from exc


def base_url(scope) -> str:
    """The server's own base URL as the client addressed it (as Starlette's request.base_url):
    scheme, Host header (else the bound address), root path; no trailing slash."""
    host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
    if host is None:
        addr, port = scope.get("server") or ("127.0.0.1", 80)
        host = f"{addr}:{port}"
    return f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}".rstrip("/")


class FastSearch:
    """POST /knn-service and /api/search answered on the raw ASGI messages, ahead of FastAPI's
    routing, Request object, CORS middleware and response classes, which cost more CPU per
    request than the search core itself on a small index (README, Benchmark). The same
    search (`handle`, in the thread pool: faiss releases the GIL) and the same answers and
    4xx errors as the routes (which stay for the OpenAPI schema and any other method)."""

    PATHS = frozenset(("/knn-service", "/api/search"))

    def __init__(self, app, handle, max_body_bytes: int, threads: int = 8):
        self.app, self.handle, self.max_body_bytes = app, handle, max_body_bytes
        # asyncio's executor hop, not anyio's to_thread (Starlette's run_in_threadpool): the
        # latter's limiter and cancel scopes cost ~0.1 ms CPU per request on the event loop.
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="search")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or \
                scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        length, origin = None, False
        for k, v in scope["headers"]:
            if k == b"content-length":
                length = v
            elif k == b"origin":
                origin = True
        try:
            if length and length.isdigit() and int(length) > self.max_body_bytes:
                raise QueryError("body_too_large", f"body of {length.decode()} bytes is over "
                                 f"{self.max_body_bytes}", 413)
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise QueryError("body_too_large", f"body over {self.max_body_bytes} bytes",
                                     413)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            status, payload = 200, await asyncio.get_running_loop().run_in_executor(
                self.pool, self.handle, scope["path"], b"".join(chunks), base_url(scope))
        except QueryError as exc:
            status, payload = exc.status, orjson.dumps({"error": exc.code,
                                                        "message": exc.detail})
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(payload)).encode())]
        if origin:  # as the CORS middleware answers any origin (allow_origins=["*"])
            headers.append((b"access-control-allow-origin", b"*"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


# ----------------------------------------------------------------------------- images
class LakeImages:
    """Thumbnails from the lake's `images` table by uid, read with the Arrow dataset of its
    Delta log (deltalake, no Spark); file statistics on uid prune the scan."""

    def __init__(self, root: str):
        self.root = root
        self._dataset = None
        self._lock = threading.Lock()

    def dataset(self):
        with self._lock:
            if self._dataset is None:
                from deltalake import DeltaTable

                self._dataset = DeltaTable(os.path.join(self.root, "images")).to_pyarrow_dataset()
            return self._dataset

    def get(self, uid: int) -> Optional[tuple[bytes, str]]:
        import pyarrow.compute as pc

        table = self.dataset().to_table(columns=["image", "image_format"],
                                        filter=(pc.field("uid") == pa.scalar(uid, pa.int64())) &
                                        (pc.field("status") == "success"))
        if table.num_rows == 0 or table.column("image")[0].as_py() is None:
            return None
        fmt = (table.column("image_format")[0].as_py() or "jpeg").lower()
        return table.column("image")[0].as_py(), {"jpg": "jpeg"}.get(fmt, fmt)


# ----------------------------------------------------------------------------- the app
class Service:
    """State of one worker: the open index folders, configs, metrics, image sources."""

    def __init__(self, spec: ServeSpec):
        self.spec = spec
        self.cfg = spec.serve
        self.dcfg = spec.download
        self.metrics = Metrics()
        self.indices: dict[str, IndexFolder] = {}
        for name, path in spec.indices:
            self.indices[name] = open_index_folder(name, path, spec.clip_model, spec.text_model,
                                                   spec.lake_root)
            if self.cfg.nprobe > 0:  # an operator's override of the build's tuned nprobe
                self.indices[name].nprobe = {m: self.cfg.nprobe for m in self.indices[name].indices}
        self.images = {name: LakeImages(f.lake_root) for name, f in self.indices.items()
                       if f.lake_root and os.path.isdir(os.path.join(f.lake_root, "images"))}
        if spec.preload_encoders:
            for f in self.indices.values():
                if f.clip_model:
                    encoders.get_encoder(f.clip_model, f.text_model, self.cfg.device)
        self.warm_up()

    def warm_up(self) -> None:
        """One search per index before the first client: the first call pays one-off costs
        (BLAS/OpenMP start, first page faults of the mmapped columns; about a second measured
        on a loaded 2-core machine) that would otherwise land on a user's query."""
        rng = np.random.default_rng(0)
        for name, f in self.indices.items():
            x = rng.standard_normal(f.dim).astype(np.float32)
            q = search.Query(indice_name=name, modality=next(iter(f.indices)),
                             embedding_input=(x / np.linalg.norm(x)).tolist(), num_images=10,
                             num_result_ids=50)
            search.run_search(q, f, self.cfg, self.dcfg, self.cfg.device)

    def folder(self, name: Optional[str]) -> IndexFolder:
        name = name or next(iter(self.indices))
        if not isinstance(name, str) or name not in self.indices:
            raise QueryError("unknown_indice", f"indice_name {str(name)[:100]!r} is not served; "
                             f"known: {sorted(self.indices)}", 404)
        return self.indices[name]


def create_app(spec: ServeSpec):
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import (FileResponse, JSONResponse, PlainTextResponse, RedirectResponse,
                                   Response)
    from starlette.concurrency import run_in_threadpool

    try:
        import torch

        torch.set_num_threads(1)  # one query per thread; workers × threads = the machine
    except ImportError:  # pragma: no cover
        pass
    import faiss

    faiss.omp_set_num_threads(1)
    svc = Service(spec)
    cfg = svc.cfg
    from laion_spark.serve.protocol import GuardedHttpTools

    # this worker's slow-client guards (uvicorn builds the protocol per connection, after this)
    GuardedHttpTools.configure(cfg)
    app = FastAPI(title="laion-spark search",
                  description="clip-retrieval compatible search over laion-spark indices; our "
                              "additions under /api/.", version="1",
                  # FastAPI's OpenTelemetry hooks: off (/metrics is ours); their per-request
                  # "is a provider configured" check showed in the worker's profile
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.service = svc
    # clip-retrieval's front may be served from another origin and call this back (as clip back).
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"],
                       allow_headers=["*"])

    def error(exc: QueryError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": exc.detail}, status_code=exc.status)

    def dumps(obj: Any) -> Response:
        return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise QueryError("body_too_large", f"body of {length} bytes is over "
                             f"{cfg.max_body_bytes}", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise QueryError("body_too_large", f"body over {cfg.max_body_bytes} bytes", 413)
            chunks.append(chunk)
        return parse_json_body(b"".join(chunks), cfg.max_json_values)

    def add_thumbnails(base: str, indice: str, rows: list) -> None:
        """`thumbnail`: an absolute URL of the row's image on this server (lake bytes or a
        redirect), for clients such as clip-retrieval's front (`urlColumn: thumbnail`) whose
        page lives on another origin."""
        for r in rows:
            if "url" in r:
                r["thumbnail"] = f"{base}/api/image/{indice}/{r['id']}"

    def do_search(body: Any) -> search.SearchResult:
        q = search.parse_query(body, svc.indices, cfg)
        folder = svc.indices[q.indice_name]
        result = search.run_search(q, folder, cfg, svc.dcfg, cfg.device)
        for step, ms in result.timings_ms.items():
            if step.endswith("_ms") and step != "encoder_load_ms":
                svc.metrics.observe(step[:-3], ms / 1000)
        svc.metrics.count_removed(result.removed)
        return result

    def answer(result: search.SearchResult, path: str) -> Any:
        if path == "/knn-service":
            return result.rows
        return {"results": result.rows, "removed": result.removed,
                "retrieved": result.retrieved, "returned": len(result.rows),
                "query_kind": result.query_kind, "timings_ms": result.timings_ms}

    def search_answer(path: str, body: Any, base: str) -> bytes:
        """One search request's answer (search, thumbnails, encode), in a pool thread: the one
        implementation behind FastSearch and the routes."""
        result = do_search(body)
        add_thumbnails(base, result.indice_name, result.rows)
        return orjson.dumps(answer(result, path), option=orjson.OPT_SERIALIZE_NUMPY)

    def handle(path: str, raw: bytes, base: str) -> bytes:
        """FastSearch's work for one request: parse, then search_answer."""
        return search_answer(path, parse_json_body(raw, cfg.max_json_values), base)

    async def routed_search(request: Request, path: str) -> Response:
        """The routes' answer (FastSearch answers these POSTs before routing; the routes keep
        them in the OpenAPI schema): the same search_answer."""
        try:
            body = await read_json(request)
            payload = await run_in_threadpool(search_answer, path, body,
                                              str(request.base_url).rstrip("/"))
        except QueryError as exc:
            return error(exc)
        return Response(payload, media_type="application/json")

    app.add_middleware(FastSearch, handle=handle, max_body_bytes=cfg.max_body_bytes)
    app.add_middleware(CountRequests, metrics=svc.metrics)

    @app.post("/knn-service", summary="clip-retrieval's search: a list of results in rank order")
    async def knn_service(request: Request):
        return await routed_search(request, "/knn-service")

    @app.post("/api/search", summary="search with our filters; results, removed counts, timings")
    async def api_search(request: Request):
        return await routed_search(request, "/api/search")

    async def read_ids(request: Request, limit: int):
        """(body, index folder, checked ids) of an `{indice_name, ids}` request."""
        body = await read_json(request)
        if not isinstance(body, dict):
            raise QueryError("bad_request", "the body must be a JSON object")
        folder = svc.folder(body.get("indice_name"))
        return body, folder, search.check_ids(body.get("ids"), folder, limit)

    @app.post("/metadata", summary="clip-retrieval's metadata by ids (infinite scroll)")
    async def metadata(request: Request):
        try:
            _, folder, ids = await read_ids(request, cfg.max_metadata_ids)
        except QueryError as exc:
            return error(exc)
        rows = await run_in_threadpool(search.rows_for, folder, ids)
        add_thumbnails(str(request.base_url).rstrip("/"), folder.name, rows)
        return dumps([{"id": r.pop("id"), "metadata": r} for r in rows])

    @app.get("/indices-list", summary="names of the served indices")
    def indices_list():
        return list(svc.indices)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text")
    def metrics():
        return PlainTextResponse(svc.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/indices", summary="each index: rows, dim, models, modalities, mclip")
    def api_indices():
        out = {}
        for name, f in svc.indices.items():
            out[name] = {"rows": f.n, "dim": f.dim, "modalities": sorted(f.indices),
                         "clip_model": f.clip_model, "text_model": f.text_model,
                         "multilingual": bool(f.text_model and f.text_model != f.clip_model),
                         "images_from_lake": name in svc.images, "nprobe": f.nprobe}
        return out

    @app.get("/api/stats", summary="rows per language group, similarity histogram, recall")
    async def api_stats(indice_name: Optional[str] = None):
        try:
            folder = svc.folder(indice_name)
        except QueryError as exc:
            return error(exc)
        return dumps(await run_in_threadpool(folder.stats))

    @app.get("/api/config", summary="the server-side defaults and limits")
    def api_config():
        return {"defaults": {"use_safety_model": cfg.safe_mode, "deduplicate": True,
                             "dedup_urls": cfg.dedup_urls, "nsfw_threshold": cfg.nsfw_threshold,
                             "near_dup_threshold": cfg.near_dup_threshold},
                "limits": {"max_num_images": cfg.max_num_images,
                           "max_num_result_ids": cfg.max_num_result_ids,
                           "max_metadata_ids": cfg.max_metadata_ids,
                           "export_max_rows": cfg.export_max_rows},
                "not_served": {"use_violence_detector": "accepted, no violence detector: "
                                                        "ignored",
                               "aesthetic_score": "accepted, no aesthetic embeddings: ignored"}}

    @app.post("/api/export", summary="a subset of ids as Parquet, an img2dataset CSV or SQL")
    async def api_export(request: Request):
        try:
            body, folder, ids = await read_ids(request, cfg.export_max_rows)
            fmt = body.get("format", "parquet")
            sims = body.get("similarities")
            if fmt not in ("parquet", "img2dataset", "sql"):
                raise QueryError("bad_format", "format must be parquet, img2dataset or sql")
        except QueryError as exc:
            return error(exc)
        data, media, fname = await run_in_threadpool(export_subset, folder, ids, fmt, sims)
        return Response(data, media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="{fname}"'})

    @app.get("/api/image/{indice_name}/{row_id}", summary="a result's image: the lake's bytes "
             "by uid when the index has a lake, else a redirect to its url")
    def api_image(indice_name: str, row_id: int):
        try:
            folder = svc.folder(indice_name)
            ids = search.check_ids([row_id], folder, 1)
        except QueryError as exc:
            return error(exc)
        row = folder.metadata.take(ids, ["uid", "url"])
        uid, url = row.column("uid")[0].as_py(), row.column("url")[0].as_py()
        source = svc.images.get(indice_name)
        if source is not None and uid is not None:
            try:
                hit = source.get(int(uid))
            except Exception as exc:  # a lake being rewritten: fall back to the url
                log.warning("serve: image %s from lake failed: %s", uid, exc)
                hit = None
            if hit is not None:
                return Response(hit[0], media_type=f"image/{hit[1]}",
                                headers={"Cache-Control": "public, max-age=86400"})
        if url and url.startswith(("http://", "https://")):
            return RedirectResponse(url, status_code=302)
        return JSONResponse({"error": "no_image", "message": f"no image for id {row_id}"}, 404)

    @app.get("/", include_in_schema=False)
    def index_page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"),
                            headers={"Cache-Control": "no-cache"})

    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def export_subset(folder: IndexFolder, ids: np.ndarray, fmt: str,
                  similarities: Any = None) -> tuple[bytes, str, str]:
    """The rows of `ids` as Parquet (every metadata column), an img2dataset input CSV (url,
    caption) or a `laion-spark sql` snippet selecting them from `pairs` by uid."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    meta = folder.metadata
    table = meta.take(ids)
    if "id" not in table.column_names:
        table = table.add_column(0, "id", pa.array(ids, pa.int64()))
    if isinstance(similarities, list) and len(similarities) == len(ids) and all(
            isinstance(s, (int, float)) for s in similarities):
        table = table.append_column("query_similarity", pa.array(similarities, pa.float32()))
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue(), "application/vnd.apache.parquet", f"{folder.name}-subset.parquet"
    if fmt == "img2dataset":
        out = pa.table({"url": table.column("url"), "caption": table.column("text")})
        buf = io.BytesIO()
        pacsv.write_csv(out, buf)
        return buf.getvalue(), "text/csv", f"{folder.name}-subset.csv"
    uids = [str(u) for u in table.column("uid").to_pylist() if u is not None]
    sql = (f"-- {len(uids)} rows of index {folder.name} (pairs rows by uid). Run:\n"
           f"--   laion-spark sql \"$(grep -v '^--' subset.sql)\" --out subset\n"
           "SELECT * FROM pairs WHERE uid IN (" + ", ".join(uids) + ")\n")
    return sql.encode(), "text/plain", f"{folder.name}-subset.sql"


def create_app_from_env():
    """uvicorn's factory in each worker process: the spec comes from the parent's env."""
    logging.basicConfig(level=os.environ.get("LAION_SPARK_SERVE_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    text = os.environ.get(SPEC_ENV)
    if not text:
        raise RuntimeError(f"{SPEC_ENV} is not set: start the service with `laion-spark serve`")
    return create_app(ServeSpec.from_json(text))
