"""Score-stage throughput without Spark: images/s of our Arrow-batch scorer against a plain
`transformers` loop (the clip-retrieval way: decode, CLIPProcessor, model), same images, same model.

    python benchmarks/score.py                       # CPU defaults: ViT-B/32, small counts
    python benchmarks/score.py --models b32,l14 --batch-sizes 64,256,512 --dtypes float16,bfloat16 --batches 20

Models are random-weight CLIPs built from the ViT-B/32 and ViT-L/14 configs (same compute as the
trained ones, no download). Input: Arrow record batches of 256 px JPEGs (demo scenes, letterboxed
as the download stage writes them). Two modes, so the bound is visible:
  decode=on   JPEG bytes -> pairs rows (decode + resize + crop + both towers + safety tags)
  decode=off  preprocessed pixels -> image embeddings (the GPU's compute bound)
Ours overlaps decode with the model (background threads) and normalises on the device; the
baseline runs decode, CLIPProcessor and the model one after the other.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from laion_spark.score.preprocess import PreprocessSpec, preprocess_bytes  # noqa: E402

log = logging.getLogger("bench.score")

CONFIGS = {
    "b32": dict(text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
                vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                   num_hidden_layers=12, patch_size=32, image_size=224), projection_dim=512),
    "l14": dict(text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
                vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                   num_hidden_layers=24, patch_size=14, image_size=224), projection_dim=768),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_model_dir(name: str, root: str) -> str:
    """A random-weight CLIP of the named size with the demo tokenizer, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from laion_spark.score.demo_model import EOS_ID, PAD_ID, build_demo_tokenizer

    out = os.path.join(root, name)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    tok = build_demo_tokenizer()
    cfg = dict(CONFIGS[name])
    cfg["text_config"] = dict(cfg["text_config"], vocab_size=len(tok), max_position_embeddings=77,
                              eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**cfg)).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessorPil().save_pretrained(out)
    return out


def make_images(n: int, seed: int = 0) -> list[bytes]:
    from laion_spark.demo.scenes import describe_scene, random_scene, render_scene
    from laion_spark.score.demo_model import _letterbox

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        img = _letterbox(render_scene(scene, rng.choice([(320, 240), (400, 300), (256, 256)]), rng), 256)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        out.append((buf.getvalue(), describe_scene(scene, "en", rng)))
    return out


def arrow_batches(images: list, n_rows: int, rows_per_batch: int = 8192) -> list[pa.RecordBatch]:
    rows = [{"uid": i, "url": f"http://bench/{i}.jpg", "text": images[i % len(images)][1], "language": "en",
             "language_group": "en", "status": "success", "image": images[i % len(images)][0], "shard": "0"}
            for i in range(n_rows)]
    return pa.Table.from_pylist(rows).to_batches(max_chunksize=rows_per_batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ours(model_dir: str, batches: list[pa.RecordBatch], batch_size: int, dtype: str, device: str,
               decode: bool, threads: int) -> float:
    from laion_spark.config import ScoreConfig
    from laion_spark.score.models import bundle_from_config, get_models
    from laion_spark.score.scorer import ScoreSettings, score_record_batches

    cfg = ScoreConfig(clip_model=model_dir, batch_size=batch_size, device=device, dtype=dtype,
                      preprocess_threads=threads)
    bundle = bundle_from_config(cfg)
    models = get_models(bundle.key, lambda: bundle, device, dtype)
    n = sum(b.num_rows for b in batches)
    if decode:
        settings = ScoreSettings.from_config(cfg)
        list(score_record_batches([batches[0].slice(0, batch_size)], models, settings))  # warm-up
        _sync(models.device)
        t = time.perf_counter()
        rows = sum(b.num_rows for b in score_record_batches(batches, models, settings))
        _sync(models.device)
        assert rows == n
        return n / (time.perf_counter() - t)
    crops = np.stack([preprocess_bytes(b, models.spec)[0] for b in batches[0].column("image").to_pylist()[:batch_size]])
    models.embed_images(crops)
    _sync(models.device)
    t = time.perf_counter()
    done = 0
    while done < n:
        models.embed_images(crops)
        done += len(crops)
    _sync(models.device)
    return done / (time.perf_counter() - t)


def bench_baseline(model_dir: str, batches: list[pa.RecordBatch], batch_size: int, dtype: str, device: str,
                   decode: bool) -> float:
    """The plain loop: PIL decode, CLIPProcessor, model, both towers, one batch after the other."""
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    dev = torch.device(device)
    dt = DTYPES[dtype]
    model = CLIPModel.from_pretrained(model_dir, dtype=dt).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = CLIPImageProcessorPil.from_pretrained(model_dir)
    table = pa.Table.from_batches(batches)
    images, texts = table.column("image").to_pylist(), table.column("text").to_pylist()
    n = len(images)
    with torch.inference_mode():
        if not decode:
            pixels = proc(images=[Image.open(io.BytesIO(b)) for b in images[:batch_size]],
                          return_tensors="pt")["pixel_values"].to(dev, dt)
            model.get_image_features(pixel_values=pixels)
            _sync(dev)
            t = time.perf_counter()
            done = 0
            while done < n:
                model.get_image_features(pixel_values=pixels)
                done += batch_size
            _sync(dev)
            return done / (time.perf_counter() - t)
        t = None
        for start in range(-batch_size, n, batch_size):  # the first (negative) slice is the warm-up
            lo = max(0, start)
            chunk = slice(lo, lo + batch_size)
            if start == 0:
                _sync(dev)
                t = time.perf_counter()
            pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[chunk]]
            pixels = proc(images=pil, return_tensors="pt")["pixel_values"].to(dev, dt)
            enc = tok(texts[chunk], padding=True, truncation=True, max_length=77, return_tensors="pt").to(dev)
            img = model.get_image_features(pixel_values=pixels)
            txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            img = torch.nn.functional.normalize(img.float(), dim=-1)
            txt = torch.nn.functional.normalize(txt.float(), dim=-1)
            (img * txt).sum(-1).cpu().numpy()
        _sync(dev)
        return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="b32,l14" if cuda else "b32")
    p.add_argument("--batch-sizes", default="64,256,512" if cuda else "16,32")
    p.add_argument("--dtypes", default="float16,bfloat16" if cuda else "float32,bfloat16")
    p.add_argument("--batches", type=int, default=20 if cuda else 2, help="batches timed per setting")
    p.add_argument("--decode", default="on,off")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="decode/preprocess threads of our scorer")
    p.add_argument("--unique-images", type=int, default=256)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--model-cache", default=os.path.join(tempfile.gettempdir(), "laion-spark-bench-models"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("transformers", "laion_spark"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    images = make_images(args.unique_images)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU x{os.cpu_count()}"
    print(f"device: {device_name}; torch {torch.__version__}; decode threads {args.threads}")
    print(f"{'model':5} {'dtype':8} {'batch':>5} {'decode':6} {'ours img/s':>11} {'plain img/s':>12} {'ratio':>6}")
    results = []
    for name in args.models.split(","):
        model_dir = make_model_dir(name, args.model_cache)
        for dtype in args.dtypes.split(","):
            for bs in (int(b) for b in args.batch_sizes.split(",")):
                batches = arrow_batches(images, bs * args.batches)
                for decode in args.decode.split(","):
                    on = decode == "on"
                    ours = bench_ours(model_dir, batches, bs, dtype, args.device, on, args.threads)
                    plain = bench_baseline(model_dir, batches, bs, dtype, args.device, on)
                    results.append(dict(model=name, dtype=dtype, batch_size=bs, decode=decode, ours=round(ours, 1),
                                        plain=round(plain, 1), ratio=round(ours / plain, 2), device=device_name))
                    print(f"{name:5} {dtype:8} {bs:>5} {decode:6} {ours:>11.1f} {plain:>12.1f} {ours / plain:>6.2f}",
                          flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
