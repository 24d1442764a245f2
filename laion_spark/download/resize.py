"""Decode, check, orient, resize and encode one image with Pillow.

Order matters for safety and speed: the byte-size and format checks and the pixel-count check
read only the header (a 100,000 x 100,000 PNG of a few hundred bytes is refused before any pixel
buffer exists); JPEGs are then decoded straight at a reduced DCT scale (`Image.draft`) close to
the target size, which is where most of the CPU per image goes otherwise.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import io
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image

from laion_spark.config import DownloadConfig
from laion_spark.download.safety import clean_detail

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
OUTPUT_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
# Pillow warns between MAX_IMAGE_PIXELS and 2x it; our own pixel limits decide (DecompressionBomb
# *Error* above 2x is still caught per image). One process-wide filter, set once at import:
# `warnings.catch_warnings()` per image swapped the global filter list from many decode threads at
# once (not thread-safe: a thread could restore another's list, or the warning leak out).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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


# --------------------------------------------------------------------------- JPEG structure
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker after entropy data (not RSTn, not a stuffed 0)
_SOF_HUFFMAN = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive: the ones Pillow decodes with Huffman codes
_SOF_ALL = _SOF_HUFFMAN | {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass
class JpegLayout:
    """What the marker segments of a JPEG say, read without decoding (a few ms for 20 MB)."""

    width: int = 0
    height: int = 0
    huffman: bool = True
    progressive: bool = False
    blocks: int = 0  # 8x8 blocks over all components at full size
    scans: int = 0
    scan_starts: list = field(default_factory=list)  # byte offsets of the SOS markers
    entropy_bytes: int = 0  # coded data after all SOS headers


def jpeg_layout(data: bytes, max_scans: int, deadline: Optional[float] = None) -> Optional[JpegLayout]:
    """Walk the markers up to EOI (stopping after `max_scans` + 1 scans); None when the bytes are
    not a JPEG this walk understands (Pillow then decides). DecodeTimeout after `deadline`: 20 MB
    of fill bytes or empty segments is millions of steps (1.5 s idle, 7-12 s on a loaded box)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    out = JpegLayout()
    pos, n = 2, len(data)
    steps = 0
    while pos + 4 <= n:
        steps += 1
        if deadline is not None and not steps & 4095 and time.monotonic() > deadline:
            raise DecodeTimeout()
        if data[pos] != 0xFF:
            return out if out.scans else None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > n:
            break
        if marker in _SOF_ALL and length >= 8:
            seg = data[pos + 4:end]
            out.height, out.width = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big")
            out.huffman = marker in _SOF_HUFFMAN
            out.progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
            comps = [(seg[7 + 3 * i] >> 4, seg[7 + 3 * i] & 15) for i in range(min(seg[5], (len(seg) - 6) // 3))]
            hmax = max((c[0] for c in comps), default=1) or 1
            vmax = max((c[1] for c in comps), default=1) or 1
            out.blocks = sum(-(-(-(-out.width * hs // hmax)) // 8) * -(-(-(-out.height * vs // vmax)) // 8)
                             for hs, vs in comps)
        elif marker == 0xDA:
            out.scans += 1
            out.scan_starts.append(pos)
            if out.scans > max_scans:
                return out
            found = _JPEG_MARKER.search(data, end)
            stop = found.start() if found else n
            out.entropy_bytes += stop - end
            end = stop
        pos = end
    return out


# --------------------------------------------------------------------------- decode under limits
class DecodeTimeout(Exception):
    """The per-image decode deadline passed."""


class _DeadlineReader(io.BytesIO):
    """The bytes Pillow decodes from, with the decode deadline checked on every read. Pillow's
    decoders work on what each read returns (`decodermaxblock` bytes, set small), so this interrupts
    a slow decode between pieces. For a JPEG's pixel data (`split_at` set after the header is
    parsed) a piece also never crosses the start of a scan: one read then costs at most one scan,
    and a near-empty progressive scan still walks every block (~13 ms on a large image)."""

    def __init__(self, data: bytes, deadline: float):
        super().__init__(data)
        self.deadline = deadline
        self.split_at: list = []

    def read(self, size: Optional[int] = -1) -> bytes:  # type: ignore[override]
        if time.monotonic() > self.deadline:
            raise DecodeTimeout()
        if self.split_at and size is not None and size > 0:
            pos = self.tell()
            i = bisect.bisect_right(self.split_at, pos)
            if i < len(self.split_at):
                size = min(size, self.split_at[i] - pos)
        return super().read(size)


DECODE_PIECE = 16384  # bytes handed to a decoder between deadline checks

_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# Pillow decodes every WebP through libwebp's animation decoder, which holds two full RGBA canvases
# (the frame and the disposed previous one), and copies the frame out before filling its raster:
# 12 bytes a pixel beyond Pillow's own (measured: 16.0 per pixel for an RGB WebP, 4 estimated before).
_DECODER_BYTES_PER_PIXEL = {"WEBP": 12}


def decode_bytes_estimate(img: Image.Image, size: tuple[int, int], layout: Optional[JpegLayout]) -> int:
    """Peak memory of decoding and shrinking, from the header alone: the raster Pillow allocates
    (pixels x its bytes per pixel: 1 for L/P, 2 for 16-bit grey, 4 for every multi-band mode),
    one full-size 4-byte working copy unless the mode is RGB or L (a conversion for P/CMYK/16-bit,
    the premultiplied copy Pillow resizes RGBA/LA in), and for progressive JPEG libjpeg's
    whole-image coefficient buffer (64 x 2 bytes per 8x8 block, whatever the draft scale), and
    for WebP libwebp's own canvases."""
    pixels = size[0] * size[1]
    need = pixels * (_BYTES_PER_PIXEL.get(img.mode, 4) + _DECODER_BYTES_PER_PIXEL.get(img.format or "", 0))
    if img.mode not in ("RGB", "L"):
        need += pixels * 4
    if layout is not None and layout.progressive:
        need += layout.blocks * 128
    return need


def process_image(data: bytes, cfg: DownloadConfig) -> ImageResult:
    """All checks and transforms of one downloaded body; never raises for bad input."""
    result = ImageResult(sha256=hashlib.sha256(data).hexdigest())
    if len(data) < cfg.min_image_bytes:
        result.error = f"too_small: {len(data)} bytes < {cfg.min_image_bytes}"
        return result
    deadline = time.monotonic() + cfg.decode_deadline_s  # the marker walk and the decode share it
    try:
        layout = jpeg_layout(data, cfg.max_jpeg_scans, deadline)
    except DecodeTimeout:
        result.error = f"timeout: decode over {cfg.decode_deadline_s:g}s"
        return result
    if layout is not None and layout.scans > cfg.max_jpeg_scans:
        result.error = f"too_many_scans: JPEG with over {cfg.max_jpeg_scans} scans"
        return result
    reader = _DeadlineReader(data, deadline)
    try:
        img = Image.open(reader, formats=_open_formats(tuple(cfg.allowed_formats)))
    except Image.DecompressionBombError as exc:
        result.error = f"too_many_pixels: {clean_detail(str(exc))}"
        return result
    except DecodeTimeout:
        result.error = f"timeout: decode over {cfg.decode_deadline_s:g}s"
        return result
    except Exception as exc:  # UnidentifiedImageError and friends
        named = "SVG" if _looks_like_svg(data) else _sniff_format(data[:16])
        if named is not None and _format_name(named) not in cfg.allowed_formats:
            result.error = f"unsupported_format: {named}"
        else:
            result.error = f"bad_bytes: {clean_detail(f'{type(exc).__name__}: {exc}', 160)}"
        return result
    img.decodermaxblock = DECODE_PIECE
    if _format(img) == "JPEG" and layout is not None:
        reader.split_at = layout.scan_starts  # only the decoder reads from here on: short reads are fine
    try:
        return _transform(img, cfg, result, layout)
    finally:
        img.close()


def _format(img: Image.Image) -> str:
    """The format our rules know it by. MPO (a JPEG followed by more pictures: phones' gain and
    depth maps, stereo cameras) is its first picture, a plain JPEG, and is decoded as one."""
    return _format_name(img.format or "unknown")


def _format_name(fmt: str) -> str:
    return "JPEG" if fmt == "MPO" else fmt


@functools.lru_cache(maxsize=16)
def _open_formats(allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The Pillow plugins that may parse a body: the allowed formats' only (JPEG's also opens
    MPO). Every other plugin would run on web bytes before the format check: some parse for
    seconds (8 MB of EPS comment lines: 6 s, cut only by the decode deadline), and Pillow's EPS
    load starts Ghostscript. Names Pillow does not know are left out (Image.open raises on them)."""
    Image.init()
    return tuple(name for name in (a.upper() for a in allowed) if name in Image.OPEN)


def _sniff_format(prefix: bytes) -> Optional[str]:
    """The format whose header test (a few bytes, nothing parsed) accepts `prefix`: only to name
    a refused format in the error row."""
    Image.init()
    for name, (_, accept) in list(Image.OPEN.items()):
        if accept is None:
            continue
        try:
            verdict = accept(prefix)
        except Exception:
            continue
        if verdict and not isinstance(verdict, str):  # a str is Pillow's "support not installed"
            return name
    return None


def _transform(img: Image.Image, cfg: DownloadConfig, result: ImageResult,
               layout: Optional[JpegLayout]) -> ImageResult:
    fmt = _format(img)
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
    if fmt == "JPEG" and layout is not None and layout.huffman and layout.blocks:
        # Every 8x8 block costs at least one bit of Huffman-coded data in a DC scan, so fewer
        # bits than blocks means the header claims more image than the data holds; libjpeg would
        # fill the rest with grey and Pillow would call it a success.
        if layout.blocks > 8 * layout.entropy_bytes:
            result.error = (f"truncated: {w}x{h} JPEG has {layout.blocks} blocks but "
                            f"{layout.entropy_bytes} bytes of coded data")
            return result
    result.original_width, result.original_height = w, h
    try:
        if fmt != "JPEG":
            # No reduced decode outside JPEG: the whole raster is what counts. Load now, under the
            # limits, because PNG keeps EXIF after the pixels and reading it decodes them anyway.
            refused = _over_memory(img, None, cfg)
            if refused:
                result.error = refused
                return result
            img.load()
        try:
            orientation = int(img.getexif().get(0x0112, 1) or 1)
        except DecodeTimeout:
            raise
        except Exception:
            orientation = 1
        swaps = orientation in _SWAPS_AXES
        ow, oh = (h, w) if swaps else (w, h)
        result.original_width, result.original_height = ow, oh
        tw, th = target_size(ow, oh, cfg)
        if fmt == "JPEG":
            if tw < ow or th < oh:
                draft_size = (th, tw) if swaps else (tw, th)
                img.draft("RGB" if img.mode not in ("L", "CMYK") else img.mode, draft_size)
            refused = _over_memory(img, layout, cfg)
            if refused:
                result.error = refused
                return result
            img.load()
        # Shrink first, at the stored orientation, so rotation and conversion work on the small
        # image: the peak stays near the decoded raster plus one working copy.
        if img.mode.startswith("I;16"):
            img = _grey16_to_l(img)
        if img.mode not in ("RGB", "RGBA", "L", "LA"):
            img = img.convert("RGBA" if img.mode in ("PA", "P") and (
                img.mode == "PA" or "transparency" in img.info) else "RGB")
        stored_target = (th, tw) if swaps else (tw, th)
        if stored_target != img.size:
            shrinking = stored_target[0] < img.size[0]
            img = img.resize(stored_target, Image.Resampling.BICUBIC if shrinking else Image.Resampling.LANCZOS,
                             reducing_gap=3.0 if shrinking else None)
        if orientation != 1:
            img = _orient(img, orientation)
        img = _to_rgb(img)
        img = _finish(img, cfg)
        out = io.BytesIO()
        out_fmt = OUTPUT_FORMATS[cfg.output_format.lower()]
        if out_fmt == "JPEG":
            img.save(out, "JPEG", quality=cfg.encode_quality)
        else:
            img.save(out, "WEBP", quality=cfg.encode_quality, method=4)
    except DecodeTimeout:
        result.error = f"timeout: decode over {cfg.decode_deadline_s:g}s"
        return result
    except Image.DecompressionBombError as exc:
        result.error = f"too_many_pixels: {clean_detail(str(exc))}"
        return result
    except Exception as exc:  # truncated data, corrupt streams
        kind = "truncated" if "truncated" in str(exc) else "bad_bytes"
        result.error = f"{kind}: {clean_detail(f'{type(exc).__name__}: {exc}', 160)}"
        return result
    result.image = out.getvalue()
    result.image_format = "jpg" if out_fmt == "JPEG" else "webp"
    result.width, result.height = img.size
    return result


def _over_memory(img: Image.Image, layout: Optional[JpegLayout], cfg: DownloadConfig) -> Optional[str]:
    need = decode_bytes_estimate(img, img.size, layout)
    if need <= cfg.max_decode_bytes:
        return None
    return f"too_large: decoding {img.size[0]}x{img.size[1]} {img.mode} needs ~{need} bytes > max_decode_bytes {cfg.max_decode_bytes}"


_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,), 5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,), 7: (Image.Transpose.TRANSVERSE,), 8: (Image.Transpose.ROTATE_90,),
}


def _orient(img: Image.Image, orientation: int) -> Image.Image:
    """EXIF orientation applied to pixels only (as ImageOps.exif_transpose, without copying metadata)."""
    for op in _TRANSPOSE.get(orientation, ()):
        img = img.transpose(op)
    return img


def _grey16_to_l(img: Image.Image) -> Image.Image:
    """16-bit grey to 8 bits by its top byte. Pillow's own I;16 -> L conversion clips at 255, so
    everything above 1/256 of full scale came out white. Peak: the 2-byte raster plus two 2-byte
    copies (numpy's view of it, the shifted values), within the estimate (2 + 4 bytes a pixel)."""
    return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))


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
