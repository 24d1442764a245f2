"""Model loading for the score stage: the driver reads the weights once into a `ModelBundle`
(file bytes, broadcast by Spark), each executor Python process builds the models once and keeps
them in a module-level cache keyed by the bundle's digest.

Why bytes and not paths: executors may not see the driver's disk (or the Hub); a broadcast
travels with the job. Above `score.broadcast_max_bytes` (ViT-L/14 and ViT-H/14 are GBs: the driver
would hold them and push them to every executor) a model given as a path (a folder every executor
sees, or an fsspec URL such as s3://) is loaded by each executor process from that path instead,
through a per-host cache folder (`score.model_cache_dir`) so a host downloads it once. Why a process cache: Spark reuses its Python workers across tasks
(`spark.python.worker.reuse`), so a model built for one partition serves every later one; the
load counter (`LOADS`, and optional per-process lines in `load_log_dir`) lets tests prove it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from laion_spark.score.preprocess import PreprocessSpec, to_model_input
from laion_spark.score.safety import SafetyHeads, build_safety_heads

log = logging.getLogger(__name__)

_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".py")


@dataclass
class ModelBundle:
    """The model files as bytes (what the driver broadcasts) plus their names and digest."""

    clip_name: str
    clip_files: dict[str, bytes]
    text_model_name: Optional[str] = None
    text_model_files: Optional[dict[str, bytes]] = None
    heads: dict[str, bytes] = field(default_factory=dict)
    key: str = ""
    # Path-loaded models (no bytes here): "clip"/"text" -> folder or fsspec URL, plus the files'
    # (name, size, mtime) so the key changes when the weights do.
    paths: dict[str, str] = field(default_factory=dict)
    path_files: dict[str, list] = field(default_factory=dict)
    storage_options: dict[str, str] = field(default_factory=dict)
    cache_dir: str = ""  # executors' local copy of path-loaded models (default: the temp dir)

    def __post_init__(self) -> None:
        if not self.key:
            h = hashlib.sha256()
            for group in (self.clip_files, self.text_model_files or {}, self.heads):
                for name in sorted(group):
                    h.update(name.encode())
                    h.update(hashlib.sha256(group[name]).digest())
            for kind in sorted(self.paths):
                h.update(f"{kind}={self.paths[kind]}:{self.path_files.get(kind)}".encode())
            self.key = h.hexdigest()[:16]

    @property
    def source(self) -> str:
        """How executors get the weights: `path` (each loads from the path) or `broadcast`."""
        return "path" if self.paths else "broadcast"

    @property
    def n_bytes(self) -> int:
        return sum(len(v) for g in (self.clip_files, self.text_model_files or {}, self.heads) for v in g.values())


def _read_model_dir(path: str) -> dict[str, bytes]:
    """Top-level model/tokenizer/processor files of a save_pretrained folder (subfolders are other models)."""
    files = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and name.endswith(_MODEL_FILE_SUFFIXES):
            with open(full, "rb") as f:
                files[name] = f.read()
    if "config.json" not in files:
        raise FileNotFoundError(f"{path}: no config.json, not a save_pretrained model folder")
    return files


def _snapshot(name: str, kind: str) -> dict[str, bytes]:
    """A Hub name: load it once here (the driver) and serialise it with save_pretrained."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="laion-spark-model-") as tmp:
        if kind == "clip":
            from transformers import AutoProcessor, CLIPModel

            CLIPModel.from_pretrained(name).save_pretrained(tmp)
            try:
                AutoProcessor.from_pretrained(name).save_pretrained(tmp)
            except Exception:  # a bare model: tokenizer alone, default CLIP preprocessing
                AutoTokenizer.from_pretrained(name).save_pretrained(tmp)
        else:
            from laion_spark.score.mclip import MultilingualCLIP

            MultilingualCLIP.from_pretrained(name).save_pretrained(tmp)
            AutoTokenizer.from_pretrained(name).save_pretrained(tmp)
        return _read_model_dir(tmp)


def _model_files(name_or_path: str, kind: str) -> dict[str, bytes]:
    if os.path.isdir(name_or_path):
        return _read_model_dir(name_or_path)
    return _snapshot(name_or_path, kind)


def _is_path(name: str) -> bool:
    return os.path.isdir(name) or "://" in name


def _listing(path: str, storage_options: dict) -> list[tuple[str, int, str]]:
    """(name, size, version) of a model folder's top-level model files, local or fsspec."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **storage_options)
    out = []
    for info in fs.ls(root, detail=True):
        name = os.path.basename(info["name"].rstrip("/"))
        if info.get("type") == "file" and name.endswith(_MODEL_FILE_SUFFIXES):
            stamp = info.get("mtime", info.get("LastModified", info.get("ETag", "")))
            out.append((name, int(info.get("size") or 0), str(stamp)))
    if not any(n == "config.json" for n, _, _ in out):
        raise FileNotFoundError(f"{path}: no config.json, not a save_pretrained model folder")
    return sorted(out)


def _path_bundle(score_cfg, storage_options: dict) -> Optional[ModelBundle]:
    """A bundle of paths when the models are paths and together above `broadcast_max_bytes`."""
    models = {"clip": score_cfg.clip_model}
    if score_cfg.multilingual_text_model:
        models["text"] = score_cfg.multilingual_text_model
    if not all(_is_path(p) for p in models.values()):
        return None  # a Hub name is snapshotted on the driver: bytes it is
    listings = {k: _listing(p, storage_options) for k, p in models.items()}
    total = sum(size for files in listings.values() for _, size, _ in files)
    if total <= score_cfg.broadcast_max_bytes:
        return None
    heads = {}
    for head in ("nsfw_head", "watermark_head", "toxic_head"):
        if getattr(score_cfg, head):
            with open(getattr(score_cfg, head), "rb") as f:
                heads[head] = f.read()
    log.info("score: models %s (%.1f MB) above broadcast_max_bytes: each executor loads them from "
             "their path", models, total / 1e6)
    return ModelBundle(score_cfg.clip_model, {}, score_cfg.multilingual_text_model, None, heads,
                       paths=models, path_files=listings, storage_options=dict(storage_options),
                       cache_dir=score_cfg.model_cache_dir or "")


def bundle_from_config(score_cfg, storage_options: Optional[dict] = None) -> ModelBundle:
    """Driver side: read every model and head file the config names, once (or, above
    `score.broadcast_max_bytes`, only list them: executors load from the paths)."""
    started = time.time()
    by_path = _path_bundle(score_cfg, dict(storage_options or {}))
    if by_path is not None:
        return by_path
    clip_files = _model_files(score_cfg.clip_model, "clip")
    text_files = None
    if score_cfg.multilingual_text_model:
        text_files = _model_files(score_cfg.multilingual_text_model, "mclip")
    heads = {}
    for head in ("nsfw_head", "watermark_head", "toxic_head"):
        path = getattr(score_cfg, head)
        if path:
            with open(path, "rb") as f:
                heads[head] = f.read()
    bundle = ModelBundle(score_cfg.clip_model, clip_files, score_cfg.multilingual_text_model, text_files, heads)
    log.info("score: model bundle %s (%.1f MB) read in %.1fs", bundle.key, bundle.n_bytes / 1e6, time.time() - started)
    return bundle


# ----------------------------------------------------------------------------- executor side

def pick_device(setting: str = "auto") -> torch.device:
    """cuda when asked or available: the GPU Spark assigned to this task (`resources()['gpu']`),
    else cuda:0; cpu otherwise."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    index = 0
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is not None and "gpu" in ctx.resources():
            index = int(ctx.resources()["gpu"].addresses[0])
    except Exception:  # not inside a Spark task
        pass
    return torch.device(f"cuda:{index}")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[setting]


def _features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features, 4.x a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


class LoadedModels:
    """The built models of one bundle on one device: embed images and texts, tag them."""

    def __init__(self, bundle: ModelBundle, device: torch.device, dtype: torch.dtype, workdir: str) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.device, self.dtype = device, dtype
        self.clip_name = bundle.clip_name
        self.text_model_name = bundle.text_model_name
        clip_dir = _model_dir(bundle, "clip", bundle.clip_files, workdir)
        self.clip = CLIPModel.from_pretrained(clip_dir, dtype=dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(clip_dir)
        self.max_text_tokens = int(self.clip.config.text_config.max_position_embeddings)
        self.spec = PreprocessSpec.from_pretrained_dir(clip_dir, int(self.clip.config.vision_config.image_size))
        self.dim = int(self.clip.config.projection_dim)
        self.mclip = None
        mdir = None
        if bundle.text_model_files:
            mdir = _materialise(bundle.text_model_files, os.path.join(workdir, "text"))
        elif "text" in bundle.paths:
            mdir = _model_dir(bundle, "text", None, workdir)
        if mdir:
            from laion_spark.score.mclip import MultilingualCLIP

            self.mclip = MultilingualCLIP.from_pretrained(mdir, dtype=dtype).to(device).eval()
            self.mclip_tokenizer = AutoTokenizer.from_pretrained(mdir)
        self.safety: SafetyHeads = build_safety_heads(
            lambda texts: self._encode_clip_text(texts), self.dim, device,
            bundle.heads.get("nsfw_head"), bundle.heads.get("watermark_head"), bundle.heads.get("toxic_head"))

    @torch.inference_mode()
    def embed_images(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) crops -> L2-normalised (N, dim) embeddings on the device."""
        pixels = to_model_input(crops, self.spec, self.device, self.dtype)
        return F.normalize(_features(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.inference_mode()
    def _encode_clip_text(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(_features(self.clip.get_text_features(**enc)).float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str], multilingual: bool = False) -> torch.Tensor:
        """Texts -> L2-normalised (N, dim): the CLIP text tower, or the M-CLIP encoder when asked."""
        if not multilingual or self.mclip is None:
            return self._encode_clip_text(texts)
        enc = self.mclip_tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
        out = self.mclip(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        return F.normalize(out.float(), dim=-1)


def _model_dir(bundle: ModelBundle, kind: str, files: Optional[dict[str, bytes]], workdir: str) -> str:
    """A local folder holding model `kind`: the broadcast bytes written out, the path itself when
    this host sees it, else a copy in the per-host cache (downloaded once: temp folder + rename)."""
    if files:
        return _materialise(files, os.path.join(workdir, kind))
    path = bundle.paths[kind]
    if os.path.isdir(path):
        return path
    import fsspec

    cache_root = bundle.cache_dir or os.path.join(tempfile.gettempdir(), "laion-spark-model-cache")
    final = os.path.join(cache_root, f"{bundle.key}-{kind}")
    if os.path.isdir(final):
        return final
    os.makedirs(cache_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{bundle.key}-{kind}-", dir=cache_root)
    fs, root = fsspec.core.url_to_fs(path, **bundle.storage_options)
    for name, _, _ in bundle.path_files[kind]:
        fs.get_file(f"{root.rstrip('/')}/{name}", os.path.join(tmp, name))
    try:
        os.rename(tmp, final)
    except OSError:  # another process of this host finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _materialise(files: dict[str, bytes], path: str) -> str:
    os.makedirs(path, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return path


# The per-process cache and its load counter (read by tests through `load_log_dir` lines).
_CACHE: dict[str, LoadedModels] = {}
_CACHE_LOCK = threading.Lock()
LOADS: dict[str, int] = {}


def get_models(key: str, bundle_getter, device_setting: str = "auto", dtype_setting: str = "auto",
               load_log_dir: Optional[str] = None) -> LoadedModels:
    """The cached models for bundle `key` in this process; `bundle_getter()` (e.g. the broadcast's
    `.value`) is only called on a miss, so later tasks never touch the broadcast bytes."""
    device = pick_device(device_setting)
    dtype = pick_dtype(dtype_setting, device)
    cache_key = f"{key}:{device}:{dtype}"
    with _CACHE_LOCK:
        models = _CACHE.get(cache_key)
        if models is not None:
            return models
        started = time.time()
        bundle = bundle_getter()
        workdir = os.path.join(tempfile.gettempdir(), f"laion-spark-models-{os.getpid()}", key)
        models = LoadedModels(bundle, device, dtype, workdir)
        _CACHE[cache_key] = models
        LOADS[cache_key] = LOADS.get(cache_key, 0) + 1
        log.info("score: built models %s on %s/%s in %.1fs (pid %d)", bundle.clip_name, device, dtype,
                 time.time() - started, os.getpid())
        if load_log_dir:
            os.makedirs(load_log_dir, exist_ok=True)
            with open(os.path.join(load_log_dir, f"loads-{os.getpid()}.txt"), "a") as f:
                f.write(f"{cache_key} {bundle.source}\n")
        return models
