"""Image decode and CLIP preprocessing, done the way `CLIPImageProcessor` does it (PIL bicubic
resize of the shortest edge, centre crop, rescale, mean/std), split so the CPU part (decode, resize,
crop -> uint8) runs in background threads and the float part runs on the device.

Why split: on a GPU the float conversion and normalisation are free, and shipping uint8 moves 4x
fewer bytes to the device; PIL's decode and resize release the GIL, so threads overlap them with
the model.
"""
from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX,
             5: Image.HAMMING}


@dataclass(frozen=True)
class PreprocessSpec:
    """What `CLIPImageProcessor` would do: shortest edge -> `resize`, centre crop `crop`x`crop`."""

    resize: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3  # PIL bicubic, as CLIP

    @classmethod
    def from_pretrained_dir(cls, model_dir: str, image_size: int = 224) -> "PreprocessSpec":
        """Read preprocessor_config.json when the model folder has one, else CLIP's defaults."""
        path = os.path.join(model_dir, "preprocessor_config.json")
        if not os.path.exists(path):
            return cls(resize=image_size, crop=image_size)
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        size = d.get("size", image_size)
        resize = size.get("shortest_edge", size.get("height", image_size)) if isinstance(size, dict) else int(size)
        crop = d.get("crop_size", resize)
        crop = crop.get("height", resize) if isinstance(crop, dict) else int(crop)
        return cls(resize=int(resize), crop=int(crop), mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
                   std=tuple(d.get("image_std", OPENAI_CLIP_STD)), resample=int(d.get("resample", 3)))


def resize_and_crop(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB PIL image -> uint8 array (crop, crop, 3): shortest edge to `spec.resize`, centre crop."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    short, long_ = (w, h) if w <= h else (h, w)
    new_short = spec.resize
    new_long = int(new_short * long_ / short)  # as transformers' get_resize_output_image_size
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=_RESAMPLE.get(spec.resample, Image.BICUBIC))
    arr = np.asarray(image, dtype=np.uint8)
    c = spec.crop
    top = (new_h - c) // 2
    left = (new_w - c) // 2
    if top < 0 or left < 0:  # smaller than the crop: pad with zeros like the processor does
        out = np.zeros((c, c, 3), dtype=np.uint8)
        src = arr[max(0, top):max(0, top) + c, max(0, left):max(0, left) + c]
        oy, ox = max(0, -top), max(0, -left)
        out[oy:oy + src.shape[0], ox:ox + src.shape[1]] = src
        return out
    return np.ascontiguousarray(arr[top:top + c, left:left + c])


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image; raises ValueError with the reason on anything undecodable."""
    if not data:
        raise ValueError("empty image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types for bad bytes
        raise ValueError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return image.convert("RGB") if image.mode != "RGB" else image


def preprocess_bytes(data: Optional[bytes], spec: PreprocessSpec) -> tuple[Optional[np.ndarray], Optional[str]]:
    """One row's image -> (uint8 crop, None) or (None, error message); never raises."""
    if data is None:
        return None, "no image bytes"
    try:
        return resize_and_crop(decode_image(data), spec), None
    except Exception as exc:
        return None, str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


def to_model_input(crops: Sequence[np.ndarray] | np.ndarray, spec: PreprocessSpec,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised (N, 3, H, W) pixel_values on `device` in `dtype`."""
    arr = np.stack(crops) if not isinstance(crops, np.ndarray) else crops
    t = torch.from_numpy(arr)
    if torch.device(device).type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    t = t.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean, device=t.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=t.device).view(1, 3, 1, 1)
    return ((t - mean) / std).to(dtype)
