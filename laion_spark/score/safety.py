"""Safety and quality tags computed from the CLIP embeddings: `punsafe`, `pwatermark`, `ptoxic`.

Trained heads when a weights file is given, zero-shot prompts otherwise:
- `punsafe`: LAION's CLIP-based-NSFW-Detector architecture (a fixed standardisation, then an MLP,
  sigmoid = P(NSFW)) on the L2-normalised image embedding. Its released PyTorch state dicts
  (`norm.mean`, `norm.variance`, `linear_1..4`) load as they are; the layer sizes follow the
  embedding size (768: the ViT-L/14 head; 512: the ViT-B/32 head).
- `pwatermark`: a linear probe on the image embedding (LAION's own detector is an EfficientNet on
  pixels; a probe on the embedding reuses the CLIP pass), weights `weight` (1 or 2, dim) + `bias`.
- `ptoxic`: a linear probe on the text embedding, same file format.
Zero-shot: softmax(100 * cosine) over a prompt list encoded with the CLIP text tower; the score is
the probability mass of the prompts of the flagged group.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

NSFW_PROMPTS = (
    ["a photo", "a drawing", "an illustration", "a selfie", "a landscape", "food", "a diagram", "a logo",
     "text", "a product photo", "people", "an animal"],
    ["porn", "a naked person", "nudity", "sexual content", "explicit sex", "a nude body"],
)
WATERMARK_PROMPTS = (
    ["a photo", "a clean image", "a drawing", "an illustration", "a picture without text"],
    ["a watermarked image", "a stock photo with a watermark", "an image with a watermark logo",
     "a photo with copyright text overlay"],
)
TOXIC_PROMPTS = (
    ["a description of a picture", "a photo caption", "a product name", "a neutral sentence", "a title"],
    ["an insult", "hate speech", "a slur", "a threat of violence", "an obscene insult"],
)


class Standardisation(nn.Module):
    """(x - mean) / (sqrt(variance) + 1e-10): the Keras Normalization layer of LAION's heads."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.variance.sqrt() + 1e-10)


class NSFWHead(nn.Module):
    """LAION's CLIP-based NSFW detector: 768-d input -> 64 -> 512 -> 256 -> 1 (ViT-L/14 head),
    512-d (ViT-B/32 head) -> 32 -> 32 -> 1; sigmoid output, 1 = NSFW."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.norm = Standardisation(dim)
        self.act = nn.ReLU()
        if dim == 512:
            self.linear_1, self.linear_2, self.linear_3 = nn.Linear(512, 32), nn.Linear(32, 32), nn.Linear(32, 1)
            self.dropout = nn.Dropout(0.5)
            self.layers = ["linear_1", "linear_2", "linear_3"]
        else:
            self.linear_1, self.linear_2 = nn.Linear(dim, 64), nn.Linear(64, 512)
            self.linear_3, self.linear_4 = nn.Linear(512, 256), nn.Linear(256, 1)
            self.layers = ["linear_1", "linear_2", "linear_3", "linear_4"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for name in self.layers[:-1]:
            x = self.act(getattr(self, name)(x))
        return torch.sigmoid(getattr(self, self.layers[-1])(x)).squeeze(-1)


class LinearProbe(nn.Module):
    """A linear classifier on an embedding: 1 output -> sigmoid, 2 outputs -> softmax[flag_index]."""

    def __init__(self, dim: int, outputs: int = 1, flag_index: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, outputs)
        self.flag_index = flag_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x)
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits).squeeze(-1)
        return torch.softmax(logits, dim=-1)[..., self.flag_index]


def _load_state_dict(path_or_bytes: str | bytes) -> dict:
    import io

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    obj = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError("a safety head file must hold a state dict")
    return obj


def load_nsfw_head(weights: str | bytes, dim: int) -> NSFWHead:
    """Build the head for `dim` and load LAION's released state dict (strict: a wrong file fails)."""
    head = NSFWHead(dim)
    head.load_state_dict(_load_state_dict(weights), strict=True)
    return head.eval()


def load_linear_probe(weights: str | bytes, dim: int) -> LinearProbe:
    """`{"weight": (k, dim), "bias": (k,)}` (also `linear.weight`), optional `flag_index`."""
    sd = _load_state_dict(weights)
    sd = {k.removeprefix("linear."): v for k, v in sd.items()}
    flag_index = int(sd.pop("flag_index", torch.tensor(0)))
    weight = sd["weight"]
    if weight.ndim == 1:
        weight = weight[None]
    if weight.shape[1] != dim:
        raise ValueError(f"probe expects {weight.shape[1]}-d embeddings, model gives {dim}-d")
    probe = LinearProbe(dim, weight.shape[0], flag_index)
    probe.linear.load_state_dict({"weight": weight, "bias": sd["bias"].reshape(-1)})
    return probe.eval()


@dataclass
class ZeroShotTag:
    """Prompt embeddings (normalised) and which of them are the flagged group."""

    prompts: torch.Tensor  # (k, dim)
    flagged: torch.Tensor  # (k,) bool

    def __call__(self, emb: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(100.0 * emb @ self.prompts.T, dim=-1)
        return probs[:, self.flagged].sum(-1)


def zero_shot_tag(encode_text, prompts: tuple[list[str], list[str]]) -> ZeroShotTag:
    """`encode_text(list[str]) -> normalised (k, dim) tensor`; prompts = (neutral, flagged)."""
    neutral, flagged = prompts
    emb = encode_text(list(neutral) + list(flagged)).float()
    mask = torch.zeros(len(neutral) + len(flagged), dtype=torch.bool)
    mask[len(neutral):] = True
    return ZeroShotTag(emb, mask.to(emb.device))


@dataclass
class SafetyHeads:
    """The three taggers of one model; `kind` says which are trained heads and which zero-shot."""

    nsfw: object
    watermark: object
    toxic: object
    kind: dict[str, str]

    @torch.no_grad()
    def image_tags(self, image_emb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = image_emb.float()
        return self.nsfw(x).cpu().numpy(), self.watermark(x).cpu().numpy()

    @torch.no_grad()
    def text_tags(self, text_emb: torch.Tensor) -> np.ndarray:
        return self.toxic(text_emb.float()).cpu().numpy()


def build_safety_heads(encode_text, dim: int, device: torch.device, nsfw: Optional[bytes] = None,
                       watermark: Optional[bytes] = None, toxic: Optional[bytes] = None) -> SafetyHeads:
    """Trained heads where weights were given, zero-shot prompts for the rest."""
    kind = {}
    if nsfw is not None:
        nsfw_tagger, kind["punsafe"] = load_nsfw_head(nsfw, dim).to(device), "trained head (NSFW MLP)"
    else:
        nsfw_tagger, kind["punsafe"] = zero_shot_tag(encode_text, NSFW_PROMPTS), "zero-shot prompts"
    if watermark is not None:
        wm_tagger, kind["pwatermark"] = load_linear_probe(watermark, dim).to(device), "trained head (linear probe)"
    else:
        wm_tagger, kind["pwatermark"] = zero_shot_tag(encode_text, WATERMARK_PROMPTS), "zero-shot prompts"
    if toxic is not None:
        toxic_tagger, kind["ptoxic"] = load_linear_probe(toxic, dim).to(device), "trained head (linear probe)"
    else:
        toxic_tagger, kind["ptoxic"] = zero_shot_tag(encode_text, TOXIC_PROMPTS), "zero-shot prompts"
    return SafetyHeads(nsfw_tagger, wm_tagger, toxic_tagger, kind)
