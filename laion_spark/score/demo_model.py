"""`laion-spark train-demo-clip`: train a small CLIP on the demo web's scenes and captions.

Why: no model can be downloaded here, and a random-weight CLIP gives similarities that mean
nothing. A `transformers.CLIPModel` with a small config, a BPE tokenizer trained locally on the
captions of all five demo languages, and one to two minutes of CPU training separates matching
alt texts from mismatching ones, hard negatives (same colour, another shape or count) included
(ROC AUC about 0.96 on the test's demo web), so the demo's `passes_filter` behaves like LAION's.
An M-CLIP-style multilingual text encoder (XLM-R-style + linear projection) is then distilled
from the CLIP text tower on parallel captions, the way M-CLIP was trained (teacher: the English
caption's CLIP embedding; student: its translations).

Everything is saved with `save_pretrained`: the folder loads with `CLIPModel.from_pretrained`,
`AutoTokenizer.from_pretrained` and `CLIPImageProcessorPil.from_pretrained`; the multilingual
encoder lives in `<out>/multilingual`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from laion_spark.score.mclip import build_mclip
from laion_spark.score.preprocess import PreprocessSpec, resize_and_crop, to_model_input

log = logging.getLogger(__name__)

DEMO_IMAGE_SIZE = 64
MAX_TEXT_TOKENS = 48
INFO_FILE = "demo_clip.json"
# Ids fixed so CLIP pools at the first </s> (eos_token_id != 2 selects that code path).
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass
class DemoClipResult:
    """Where the model went and how training went (also written to demo_clip.json)."""

    clip_path: str
    multilingual_path: Optional[str]
    steps: int
    train_seconds: float
    distill_steps: int
    heldout_auc: float
    heldout_auc_multilingual: Optional[float]
    reused: bool = False


# ----------------------------------------------------------------------------- data

def _letterbox(image: Image.Image, size: int) -> Image.Image:
    """Fit into size x size keeping the aspect ratio, pad with black: the download stage's
    default `border` resize, so training sees what the score stage will see."""
    w, h = image.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = image.resize((nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def _caption(scene, lang: str, rng: random.Random) -> str:
    from laion_spark.demo import text as T
    from laion_spark.demo.scenes import describe_scene

    caption = describe_scene(scene, lang, rng)
    if rng.random() < 0.12:
        caption = rng.choice(T.CAPTION_PREFIXES[lang]) + caption
    return caption


def _caption_corpus() -> list[str]:
    """Every caption the demo can write (all scenes, templates, languages) plus its other alts."""
    from laion_spark.demo import text as T
    from laion_spark.demo.scenes import BACKGROUNDS, COLORS, LANGUAGES, MAX_COUNT, N_TEMPLATES, SHAPES, Scene, describe_scene

    class _Fixed(random.Random):
        def __init__(self, k: int) -> None:
            super().__init__(0)
            self.k = k

        def randrange(self, *args, **kwargs):  # picks the template
            return self.k

    corpus: list[str] = []
    for shape in SHAPES:
        for color in COLORS:
            for count in range(1, MAX_COUNT + 1):
                for bg in BACKGROUNDS:
                    if bg == color:
                        continue
                    scene = Scene(shape, color, bg, count)
                    for lang in LANGUAGES:
                        for k in range(N_TEMPLATES):
                            corpus.append(describe_scene(scene, lang, _Fixed(k)))
    for pools in (T.GENERIC_ALTS, T.SHORT_ALTS, T.CAPTION_PREFIXES, T.TITLES):
        for items in pools.values():
            corpus.extend(items)
    corpus.extend(T.LOGO_ALTS.values())
    return corpus


def build_demo_tokenizer(vocab_size: int = 2000):
    """A byte-fallback-free BPE tokenizer trained on the demo captions (NFKC, lowercased), wrapped
    as a `PreTrainedTokenizerFast` so `AutoTokenizer` loads it back."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1,
                                  show_progress=False)
    tok.train_from_iterator(_caption_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)])
    assert tok.token_to_id("</s>") == EOS_ID and tok.token_to_id("<pad>") == PAD_ID
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=MAX_TEXT_TOKENS)


def build_demo_clip(vocab_size: int, image_size: int = DEMO_IMAGE_SIZE, patch_size: int = 8, hidden: int = 128,
                    layers: int = 2):
    """The small CLIPModel: a `layers`-layer ViT (patch 8) and text transformer, 64-d space."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=4, max_position_embeddings=MAX_TEXT_TOKENS, pad_token_id=PAD_ID,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=4, num_channels=3)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)
    return CLIPModel(cfg)


def _render_pool(n: int, rng: random.Random, spec: PreprocessSpec) -> tuple[list, np.ndarray]:
    """n random scenes drawn as the demo web draws them, letterboxed like the downloader, then
    resized and cropped like the score stage."""
    from laion_spark.demo.scenes import random_scene, render_scene

    sizes = [(320, 240), (400, 300), (240, 320), (256, 256), (360, 240), (300, 300)]
    scenes, crops = [], []
    for _ in range(n):
        scene = random_scene(rng)
        image = render_scene(scene, rng.choice(sizes), rng)
        if rng.random() < 0.8:
            image = _letterbox(image, 256)
        crops.append(resize_and_crop(image, spec))
        scenes.append(scene)
    return scenes, np.stack(crops)


# ----------------------------------------------------------------------------- training

def _encode_texts(tokenizer, texts: list[str]) -> dict:
    return tokenizer(texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt",
                     return_token_type_ids=False)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC from two score samples (Mann-Whitney U; ties count half)."""
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks over ties
        idx = scores == value
        ranks[idx] = ranks[idx].mean()
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _heldout_pairs(rng: random.Random, spec: PreprocessSpec, n: int = 160, langs=("en", "de", "fr", "es", "ja")):
    """(crops, texts, labels): each image with its caption, a one/two-attribute-off caption and a
    generic alt text, as the demo web mixes them."""
    from laion_spark.demo import text as T
    from laion_spark.demo.scenes import different_scene

    scenes, crops = _render_pool(n, rng, spec)
    images, texts, labels = [], [], []
    for scene, crop in zip(scenes, crops):
        lang = rng.choice(langs)
        for text, label in ((_caption(scene, lang, rng), 1),
                            (_caption(different_scene(scene, rng), lang, rng), 0),
                            (rng.choice(T.GENERIC_ALTS[lang]), 0)):
            images.append(crop)
            texts.append(text)
            labels.append(label)
    return np.stack(images), texts, np.array(labels)


def _features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features, 4.x a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


_VARIED_FIELDS = ("shape", "count", "color")


def _one_off(scene, field: str, rng: random.Random):
    """`scene` with exactly one of shape, count or colour changed (the demo web's hard negatives
    change one or two of these, see `different_scene`)."""
    from laion_spark.demo.scenes import COLORS, SHAPES, Scene

    shape, color, count = scene.shape, scene.color, scene.count
    if field == "shape":
        shape = rng.choice([s for s in SHAPES if s != shape])
    elif field == "color":
        color = rng.choice([c for c in COLORS if c not in (color, scene.background)])
    else:
        count = rng.choice([n for n in range(1, 5) if n != count])
    return Scene(shape, color, scene.background, count)


def _sample_batch(rng: random.Random, by_color: dict, scenes: list, batch_size: int, group: int) -> list[int]:
    """Pool indices for one batch, in groups of `group` distinct scenes of one colour, so that the
    other images in a batch are hard negatives too (same colour, another shape or count); one image
    per scene, so the batch holds no false negatives."""
    idx, seen = [], set()
    colors = sorted(by_color)
    while len(idx) < batch_size:
        members = by_color[rng.choice(colors)]
        taken = 0
        for _ in range(group * 4):
            i = members[rng.randrange(len(members))]
            if scenes[i] not in seen:
                seen.add(scenes[i])
                idx.append(i)
                taken += 1
                if taken == group or len(idx) == batch_size:
                    break
    return idx


class _AttributeHeads(torch.nn.Module):
    """Training-only linear heads on the normalised embeddings, shared by both towers: shape,
    colour, background and count of the scene an image shows or a caption describes.

    Why: contrastive learning from scratch learns colour first and sits at "colour only" for
    hundreds of steps before shape and count appear; shared attribute directions give both towers
    that signal from step one. Their labels are the generator's `Scene` fields, the same source
    the captions are written from. The heads are dropped after training; the saved model is a
    plain `CLIPModel`."""

    def __init__(self, dim: int) -> None:
        from laion_spark.demo.scenes import BACKGROUNDS, COLORS, MAX_COUNT, SHAPES

        super().__init__()
        self.vocab = {"shape": list(SHAPES), "color": list(COLORS), "background": list(BACKGROUNDS),
                      "count": list(range(1, MAX_COUNT + 1))}
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(v)) for k, v in self.vocab.items()})

    def loss(self, emb: torch.Tensor, scenes: list) -> torch.Tensor:
        total = emb.new_zeros(())
        for name, head in self.heads.items():
            target = torch.tensor([self.vocab[name].index(getattr(s, name)) for s in scenes])
            total = total + F.cross_entropy(head(emb) * 10.0, target)
        return total / len(self.heads)


@torch.no_grad()
def _init_patch_embedding_from_pca(model, pixels: torch.Tensor, rng: random.Random, n_patches: int = 20000) -> None:
    """Start the ViT's patch embedding at the whitened principal components of training patches.

    Why: a data-dependent first layer (as in patch-whitening inits for small ViTs) lets shape edges
    through from step one instead of after a few hundred steps of random projections."""
    conv = model.vision_model.embeddings.patch_embedding
    p = conv.kernel_size[0]
    patches = pixels.unfold(2, p, p).unfold(3, p, p)  # n, c, gh, gw, p, p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, pixels.shape[1] * p * p)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    sample = patches[torch.randperm(len(patches), generator=g)[:n_patches]].double()
    sample = sample - sample.mean(0)
    eigval, eigvec = torch.linalg.eigh(sample.T @ sample / len(sample))
    order = eigval.argsort(descending=True)[: conv.out_channels]
    weight = eigvec[:, order].T / (eigval[order].clamp(min=0) + 1e-2).sqrt()[:, None]
    conv.weight.copy_((weight / weight.norm(dim=1, keepdim=True).mean()).reshape(conv.weight.shape).float())


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_demo_clip(out_dir: str | os.PathLike, seed: int = 0, train_steps: int = 800,
                    max_train_seconds: float = 1200.0, n_train_images: int = 2400, batch_size: int = 64,
                    multilingual: bool = True, distill_steps: int = 300, threads: Optional[int] = 1,
                    reuse: bool = True, image_size: int = DEMO_IMAGE_SIZE, patch_size: int = 8,
                    hidden: int = 96, lr: float = 3e-3, warmup_steps: int = 20, group: int = 4,
                    aux_weight: float = 1.0, hard_negatives: int = 1, pca_init: bool = True,
                    layers: int = 2) -> DemoClipResult:
    """Train (or reuse, when `out_dir` already holds one) the demo CLIP and save it there.

    A fixed number of steps (not seconds), so the same seed gives the same model on a busy or an
    idle machine (`max_train_seconds` is only a safety stop); one torch thread by default because
    a shared 2-core box slows multi-threaded small matmuls down several-fold.

    Each batch: `batch_size` images (a pool rendered once, flipped at random) in groups of `group`
    sharing a colour, each with its caption (random language and template) and `hard_negatives`
    captions one attribute off (shape, count or colour), plus generic alt texts. Loss: InfoNCE
    image->all texts and text->images; a margin term that calibrates the cosine itself (matching
    >= 0.5, negatives <= 0.15); training-only attribute heads (`_AttributeHeads`). The ViT's patch
    embedding starts at the whitened PCA of training patches; the learning rate warms up, then
    decays on a cosine."""
    out = Path(out_dir)
    info_path = out / INFO_FILE
    if reuse and info_path.exists() and (out / "config.json").exists():
        data = json.loads(info_path.read_text())
        data["reused"] = True
        log.info("demo CLIP: reusing %s", out)
        return DemoClipResult(**data)
    from transformers import CLIPImageProcessorPil

    from laion_spark.demo import text as T
    from laion_spark.demo.scenes import LANGUAGES

    started, cpu_started = time.time(), time.process_time()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(f"demo-clip:{seed}")
    spec = PreprocessSpec(resize=image_size, crop=image_size)
    tokenizer = build_demo_tokenizer()
    model = build_demo_clip(len(tokenizer), image_size, patch_size, hidden, layers)
    scenes, crops = _render_pool(n_train_images, rng, spec)
    pixel_pool = to_model_input(crops, spec)
    if pca_init:
        _init_patch_embedding_from_pca(model, pixel_pool, rng)
    by_color: dict[str, list[int]] = {}
    for i, scene in enumerate(scenes):
        by_color.setdefault(scene.color, []).append(i)
    log.info("demo CLIP: tokenizer %d tokens, %d training images rendered in %.1fs", len(tokenizer),
             len(scenes), time.time() - started)

    generic = [a for pool in T.GENERIC_ALTS.values() for a in pool] + list(T.LOGO_ALTS.values())
    generic += [a for pool in T.SHORT_ALTS.values() for a in pool]
    heads = _AttributeHeads(model.config.projection_dim) if aux_weight > 0 else None
    params = list(model.parameters()) + (list(heads.parameters()) if heads is not None else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = 0
    t0 = time.time()
    model.train()
    eval_rng = random.Random(f"demo-clip:{seed}:heldout")
    h_crops, h_texts, h_labels = _heldout_pairs(eval_rng, spec)
    while steps < train_steps and time.time() - t0 < max_train_seconds:
        for g in opt.param_groups:
            g["lr"] = _lr_at(steps, train_steps, lr, warmup_steps)
        idx = _sample_batch(rng, by_color, scenes, batch_size, group)
        b = len(idx)
        langs = [rng.choice(LANGUAGES) for _ in idx]
        texts = [_caption(scenes[i], lang, rng) for i, lang in zip(idx, langs)]
        text_scenes = [scenes[i] for i in idx]
        fields = [rng.sample(_VARIED_FIELDS, hard_negatives) for _ in idx]
        for k in range(hard_negatives):
            for i, lang, f in zip(idx, langs, fields):
                other = _one_off(scenes[i], f[k], rng)
                texts.append(_caption(other, lang, rng))
                text_scenes.append(other)
        texts += rng.sample(generic, 16)
        text_scenes += [None] * 16
        pixels = pixel_pool[idx]
        flip = torch.tensor([rng.random() < 0.5 for _ in idx])
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        enc = _encode_texts(tokenizer, texts)
        img = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
        txt = F.normalize(_features(model.get_text_features(**enc)), dim=-1)
        # A one-off caption of image i may describe image j of the same batch: not a negative for j.
        same = torch.tensor([[t is not None and t == scenes[i] for t in text_scenes] for i in idx])
        same[torch.arange(b), torch.arange(b)] = False
        cos = img @ txt.T  # (b, 4b + 16)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = (scale * cos).masked_fill(same, float("-inf"))
        target = torch.arange(b)
        loss_i2t = F.cross_entropy(logits, target)
        loss_t2i = F.cross_entropy(logits[:, :b].T, target)
        # Calibrate the cosine itself, so LAION's 0.26/0.28 thresholds mean something here.
        cos_pos = cos[target, target]
        negatives = ~same
        negatives[target, target] = False
        margin = F.relu(0.5 - cos_pos).mean() + (F.relu(cos - 0.15) * negatives).sum() / negatives.sum()
        loss = (loss_i2t + loss_t2i) / 2 + margin
        if heads is not None:
            known = [k for k, t in enumerate(text_scenes) if t is not None]
            aux = heads.loss(img, [scenes[i] for i in idx]) + heads.loss(txt[known], [text_scenes[k] for k in known])
            loss = loss + aux_weight * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if steps % 100 == 0:
            log.info("demo CLIP step %d loss %.3f (%.0fs)", steps, loss.item(), time.time() - t0)
    train_s = time.time() - t0
    sims = _similarities_plain(model, tokenizer, h_crops, h_texts, spec)
    auc = _auc(sims[h_labels == 1], sims[h_labels == 0])
    log.info("demo CLIP: %d steps in %.0fs, held-out AUC %.3f (pos mean %.2f, neg mean %.2f)", steps, train_s,
             auc, sims[h_labels == 1].mean(), sims[h_labels == 0].mean())

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(out)

    mclip_path, mclip_auc, distilled = None, None, 0
    if multilingual:
        mclip, distilled = _distill_mclip(model, tokenizer, rng, distill_steps, batch_size * 2)
        mclip_sims = _similarities_plain(model, tokenizer, h_crops, h_texts, spec, mclip=mclip)
        mclip_auc = _auc(mclip_sims[h_labels == 1], mclip_sims[h_labels == 0])
        mclip_path = str(out / "multilingual")
        mclip.save_pretrained(mclip_path)
        tokenizer.save_pretrained(mclip_path)
        log.info("demo M-CLIP: %d distillation steps, held-out AUC %.3f", distilled, mclip_auc)
    result = DemoClipResult(str(out), mclip_path, steps, round(train_s, 1), distilled, round(auc, 4),
                            None if mclip_auc is None else round(mclip_auc, 4))
    info_path.write_text(json.dumps(asdict(result), indent=1))
    log.info("demo CLIP saved to %s in %.0fs wall, %.0fs CPU", out, time.time() - started,
             time.process_time() - cpu_started)
    return result


@torch.no_grad()
def _similarities_plain(model, tokenizer, crops: np.ndarray, texts: list[str], spec: PreprocessSpec,
                        mclip=None) -> np.ndarray:
    model.eval()
    img = F.normalize(_features(model.get_image_features(pixel_values=to_model_input(crops, spec))), dim=-1)
    enc = _encode_texts(tokenizer, texts)
    if mclip is None:
        txt = _features(model.get_text_features(**enc))
    else:
        mclip.eval()
        txt = mclip(enc["input_ids"], enc["attention_mask"])
    return (img * F.normalize(txt, dim=-1)).sum(-1).numpy()


def _distill_mclip(model, tokenizer, rng: random.Random, n_steps: int, batch_size: int, lr: float = 3e-3):
    """M-CLIP's recipe on parallel captions: student(translation) -> teacher(English caption)."""
    from laion_spark.demo import text as T
    from laion_spark.demo.scenes import LANGUAGES, describe_scene, random_scene

    mclip = build_mclip(len(tokenizer), model.config.projection_dim, hidden=model.config.text_config.hidden_size,
                        max_positions=MAX_TEXT_TOKENS, pad_token_id=PAD_ID)
    # M-CLIP's student starts from a pretrained XLM-R; ours starts from the teacher's token
    # embeddings (same tokenizer, same width), which halves the steps it needs to keep up.
    with torch.no_grad():
        mclip.transformer.embeddings.word_embeddings.weight.copy_(model.text_model.embeddings.token_embedding.weight)
    opt = torch.optim.AdamW(mclip.parameters(), lr=lr)
    model.eval()
    generic_en = T.GENERIC_ALTS["en"]
    steps, t0 = 0, time.time()
    while steps < n_steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(steps, n_steps, lr, 10)
        en, other = [], []
        for _ in range(batch_size):
            if rng.random() < 0.1:  # generic alts map to where CLIP puts them
                lang = rng.choice(LANGUAGES)
                text = rng.choice(T.GENERIC_ALTS[lang])
                en.append(text)
                other.append(text)
                continue
            scene, k = random_scene(rng), rng.randrange(4)
            fixed = random.Random(0)
            fixed.randrange = lambda *a, _k=k, **kw: _k  # type: ignore[method-assign]
            en.append(describe_scene(scene, "en", fixed))
            other.append(describe_scene(scene, rng.choice(LANGUAGES), fixed))
        with torch.no_grad():
            target = F.normalize(_features(model.get_text_features(**_encode_texts(tokenizer, en))), dim=-1)
        enc = _encode_texts(tokenizer, other)
        pred = mclip(enc["input_ids"], enc["attention_mask"])
        loss = F.mse_loss(pred, target) + (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    del generic_en
    return mclip, steps


# ----------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="model folder (default: <demo.out_dir>/demo-clip)")
    parser.add_argument("--steps", type=int, default=800, help="CLIP training steps")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-multilingual", action="store_true", help="skip the M-CLIP text encoder")
    parser.add_argument("--force", action="store_true", help="retrain even if the folder holds a model")


def run(ctx, args: argparse.Namespace) -> dict:
    cfg = ctx.cfg
    out = args.out or cfg.demo.clip_model_dir or os.path.join(cfg.demo.out_dir, "demo-clip")
    result = train_demo_clip(out, seed=cfg.demo.seed if args.seed is None else args.seed,
                             train_steps=args.steps, multilingual=not args.no_multilingual,
                             reuse=not args.force)
    return asdict(result)
