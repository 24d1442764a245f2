"""Decode, check, orient, resize and encode one image with Pillow.

Order matters for safety and speed: the byte-size and format checks and the pixel-count check
read only the header (a 100,000 x 100,000 PNG of a few hundred bytes is refused before any pixel
buffer exists); JPEGs are then decoded straight at a reduced DCT scale (`Image.draft`) close to
the target size, which is where most of the CPU per image goes otherwise.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Optional

from PIL import Image, ImageOps

from laion_spark.config import DownloadConfig

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
OUTPUT_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


@dataclass
class ImageResult:
    """The encoded image and its sizes, or an error code ("too_small", "bad_bytes", ...)."""

    image: Optional[bytes] = None
    image_format: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    original_width: Optional[int] = None
    original_height: Optional[int] = None
    original_format: Optional[str] = None
    sha256: Optional[str] = None
    error: Optional[str] = None


def check_config(cfg: DownloadConfig) -> None:
    if cfg.resize_mode not in RESIZE_MODES:
        raise ValueError(f"download.resize_mode must be one of {RESIZE_MODES}, got {cfg.resize_mode!r}")
    if cfg.output_format.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"download.output_format must be jpg or webp, got {cfg.output_format!r}")
    if cfg.image_size < 1:
        raise ValueError("download.image_size must be positive")


def target_size(w: int, h: int, cfg: DownloadConfig) -> tuple[int, int]:
    """The size the image is scaled to before any crop or padding."""
    mode, size = cfg.resize_mode, cfg.image_size
    if mode == "no":
        return w, h
    if mode in ("keep_ratio", "center_crop"):
        scale = size / min(w, h)
    else:  # keep_ratio_largest, border
        scale = size / max(w, h)
    if cfg.resize_only_if_bigger and scale >= 1:
        return w, h
    return max(1, round(w * scale)), max(1, round(h * scale))


def _looks_like_svg(data: bytes) -> bool:
    head = data[:1024].lstrip().lower()
    return head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head)


def process_image(data: bytes, cfg: DownloadConfig) -> ImageResult:
    """All checks and transforms of one downloaded body; never raises for bad input."""
    result = ImageResult(sha256=hashlib.sha256(data).hexdigest())
    if len(data) < cfg.min_image_bytes:
        result.error = f"too_small: {len(data)} bytes < {cfg.min_image_bytes}"
        return result
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        result.error = f"too_many_pixels: {exc}"
        return result
    except Exception as exc:  # UnidentifiedImageError and friends
        kind = "unsupported_format" if _looks_like_svg(data) else "bad_bytes"
        result.error = f"{kind}: {type(exc).__name__}: {str(exc)[:120]}"
        return result
    try:
        return _transform(img, data, cfg, result)
    finally:
        img.close()


def _transform(img: Image.Image, data: bytes, cfg: DownloadConfig, result: ImageResult) -> ImageResult:
    fmt = img.format or "unknown"
    result.original_format = fmt
    if fmt not in cfg.allowed_formats:
        result.error = f"unsupported_format: {fmt}"
        return result
    w, h = img.size
    if w < 1 or h < 1:
        result.error = f"bad_bytes: image size {w}x{h}"
        return result
    if w * h > cfg.max_image_pixels:
        result.error = f"too_many_pixels: {w}x{h} > {cfg.max_image_pixels}"
        return result
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        orientation = 1
    ow, oh = (h, w) if orientation in _SWAPS_AXES else (w, h)
    result.original_width, result.original_height = ow, oh
    tw, th = target_size(ow, oh, cfg)
    try:
        if fmt == "JPEG" and (tw < ow or th < oh):
            draft_size = (th, tw) if orientation in _SWAPS_AXES else (tw, th)
            img.draft("RGB" if img.mode not in ("L", "CMYK") else img.mode, draft_size)
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        if (tw, th) != img.size:
            shrinking = tw < img.size[0]
            img = img.resize((tw, th), Image.Resampling.BICUBIC if shrinking else Image.Resampling.LANCZOS,
                             reducing_gap=3.0 if shrinking else None)
        img = _finish(img, cfg)
        out = io.BytesIO()
        out_fmt = OUTPUT_FORMATS[cfg.output_format.lower()]
        if out_fmt == "JPEG":
            img.save(out, "JPEG", quality=cfg.encode_quality)
        else:
            img.save(out, "WEBP", quality=cfg.encode_quality, method=4)
    except Image.DecompressionBombError as exc:
        result.error = f"too_many_pixels: {exc}"
        return result
    except Exception as exc:  # truncated data, corrupt streams
        result.error = f"bad_bytes: {type(exc).__name__}: {str(exc)[:120]}"
        return result
    result.image = out.getvalue()
    result.image_format = "jpg" if out_fmt == "JPEG" else "webp"
    result.width, result.height = img.size
    return result


def _to_rgb(img: Image.Image) -> Image.Image:
    """Transparent pixels go onto white, as img2dataset does; everything else to plain RGB."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _finish(img: Image.Image, cfg: DownloadConfig) -> Image.Image:
    size = cfg.image_size
    w, h = img.size
    if cfg.resize_mode == "center_crop" and (w != size or h != size):
        if w >= size and h >= size:
            left, top = (w - size) // 2, (h - size) // 2
            return img.crop((left, top, left + size, top + size))
    if cfg.resize_mode == "border" and (w != size or h != size) and w <= size and h <= size:
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(img, ((size - w) // 2, (size - h) // 2))
        return canvas
    return img
