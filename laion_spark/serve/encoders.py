"""Query encoders: the CLIP (and M-CLIP) the index was built with, loaded once per worker
process, and the guarded paths from request bytes to an embedding.

Why the score stage's `LoadedModels`: a query must land in the same space as the indexed rows,
so the same preprocessing, pooling and normalisation code embeds both. Why the guards here: a
query image is hostile until it passed its limits: base64 size, decoded bytes, pixel count
(checked from the header before any pixel is decoded: a decompression bomb is a 4xx, not an
out-of-memory worker), and an image URL goes through the downloader's fetcher (address guard on
every hop, byte cap, one total deadline).
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import threading
import time
from dataclasses import replace
from typing import Optional

import numpy as np

from laion_spark.config import DownloadConfig, ServeConfig

log = logging.getLogger(__name__)


class QueryError(ValueError):
    """A query the service refuses; `code` is stable, the message says why (a 4xx)."""

    def __init__(self, code: str, detail: str, status: int = 400):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.status = status


_ENCODERS: dict[tuple, "QueryEncoder"] = {}
_ENCODERS_LOCK = threading.Lock()


def get_encoder(clip_model: str, text_model: Optional[str], device: str = "cpu") -> "QueryEncoder":
    """The process-wide encoder for these models (built on first use, then shared)."""
    key = (clip_model, text_model, device)
    with _ENCODERS_LOCK:
        enc = _ENCODERS.get(key)
        if enc is None:
            enc = QueryEncoder(clip_model, text_model, device)
            _ENCODERS[key] = enc
        return enc


class QueryEncoder:
    """CLIP text/image towers plus the optional M-CLIP text encoder, CPU by default."""

    def __init__(self, clip_model: str, text_model: Optional[str], device: str = "cpu"):
        import tempfile

        import torch

        from laion_spark.score.models import LoadedModels, ModelBundle, _model_files, pick_device

        started = time.time()
        mclip = text_model if text_model and text_model != clip_model else None
        bundle = ModelBundle(clip_model, _model_files(clip_model, "clip"), mclip,
                             _model_files(mclip, "mclip") if mclip else None)
        dev = pick_device(device)
        workdir = tempfile.mkdtemp(prefix="laion-spark-serve-models-")
        self.models = LoadedModels(bundle, dev, torch.float32, workdir)
        self.dim = self.models.dim
        self.has_mclip = self.models.mclip is not None
        self.lock = threading.Lock()  # torch modules are not re-entrant across threads
        self.loads = 1
        log.info("serve: encoders %s (+ %s) on %s in %.1fs", clip_model, mclip, dev,
                 time.time() - started)

    def embed_text(self, text: str, multilingual: bool = False) -> np.ndarray:
        if multilingual and not self.has_mclip:
            raise QueryError("no_mclip", "this index has no multilingual text model; "
                             "send use_mclip=false")
        with self.lock:
            out = self.models.embed_texts([text], multilingual=multilingual)
        return out[0].cpu().numpy().astype(np.float32)

    def embed_image(self, data: bytes, max_pixels: int) -> np.ndarray:
        from laion_spark.score.preprocess import resize_and_crop

        image = decode_query_image(data, max_pixels)
        crop = resize_and_crop(image, self.models.spec)
        with self.lock:
            out = self.models.embed_images(crop[None])
        return out[0].cpu().numpy().astype(np.float32)


# The raster formats a browser shows (JPEG's plugin also opens MPO). Only their Pillow plugins
# see a query's bytes: any plugin would parse them otherwise (8 MB of EPS comment lines for
# seconds), and an EPS that parses is loaded by starting Ghostscript on the sender's PostScript.
QUERY_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


def decode_query_image(data: bytes, max_pixels: int):
    """Bytes → RGB PIL image, refusing anything over `max_pixels` before decoding pixels."""
    # The download resizer's import ignores Pillow's DecompressionBombWarning process-wide, once
    # (our `max_pixels` decides, as there); a per-request catch_warnings was not thread-safe.
    from laion_spark.download.resize import Image
    if not data:
        raise QueryError("bad_image", "empty image")
    try:
        image = Image.open(io.BytesIO(data), formats=QUERY_IMAGE_FORMATS)
        w, h = image.size
        if w * h > max_pixels:
            raise QueryError("image_too_large", f"{w}x{h} pixels is over the limit of "
                             f"{max_pixels} (decompression bomb?)", 413)
        image.draft("RGB", (w, h))
        image.load()
    except QueryError:
        raise
    except Image.DecompressionBombError as exc:  # over 2x Pillow's own limit
        raise QueryError("image_too_large", f"decompression bomb: {exc}", 413) from exc
    except Exception as exc:  # PIL raises many types on hostile bytes
        raise QueryError("bad_image", f"cannot decode image: {type(exc).__name__}: {exc}") \
            from exc
    return image.convert("RGB") if image.mode != "RGB" else image


def decode_base64_image(value: str, max_bytes: int) -> bytes:
    """A base64 (optionally data: URL) string → bytes, refusing more than `max_bytes`."""
    if not isinstance(value, str):
        raise QueryError("bad_image", "image must be a base64 string")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    if len(value) * 3 // 4 > max_bytes + 4:
        raise QueryError("image_too_large", f"base64 image over {max_bytes} bytes", 413)
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise QueryError("bad_image", f"image is not valid base64: {exc}") from exc


_FETCHER = None
_FETCHER_LOCK = threading.Lock()


def fetch_query_image(url: str, scfg: ServeConfig, dcfg: DownloadConfig) -> bytes:
    """GET an image URL through the downloader's fetcher: public addresses only (every redirect
    hop re-checked), `max_image_bytes` cap, `url_deadline_s` total. Loopback/private are allowed
    only where the download config allows them (tests, the demo)."""
    global _FETCHER
    from laion_spark.download.fetch import Fetcher

    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise QueryError("bad_url", "image_url must be an http(s) URL")
    with _FETCHER_LOCK:
        if _FETCHER is None or _FETCHER.cfg.allow_loopback != dcfg.allow_loopback or \
                _FETCHER.cfg.allow_private_addresses != dcfg.allow_private_addresses:
            cfg = replace(dcfg, max_bytes=scfg.max_image_bytes,
                          total_deadline_s=scfg.url_deadline_s, retries=0,
                          respect_robots_headers=False)
            _FETCHER = Fetcher(cfg)
        fetcher = _FETCHER
    result = fetcher.fetch(url)
    if not result.ok:
        code = (result.error or "fetch_failed").split(":", 1)[0]
        status = 413 if code == "too_large" else 400
        raise QueryError(f"image_url_{code}", f"could not fetch {url[:200]}: {result.error}",
                         status)
    return result.body
