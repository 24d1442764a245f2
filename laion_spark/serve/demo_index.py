"""A small served index of the demo's scenes, embedded by the demo CLIP, without Spark: an
`images` Delta table (thumbnails by uid) and an index folder built by the index core.

Why: the service's tests and a quick look at the page need an index whose ground truth is
known (each row's scene), with planted rows for each filter (a near-duplicate image, a
duplicate URL, a high-`punsafe` row), in seconds rather than a full `laion-spark demo` run.
The index folder is the index job's layout plus the per-row language columns the index stage
is adding, so it is also what the service gets from `laion-spark index`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# Scenes the tests query for: each drawn TARGET_ROWS times (counts and backgrounds vary).
TARGETS = [("circle", "red"), ("star", "yellow"), ("square", "blue"), ("triangle", "green"),
           ("ring", "purple"), ("cross", "orange")]
TARGET_ROWS = 14
LANG_GROUP = {"en": "en", "de": "multi", "fr": "multi", "es": "multi", "ja": "multi"}


def _jpeg(image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_demo_index(out_dir: str, clip_dir: str, n_random: int = 150, seed: int = 0,
                     lake_root: Optional[str] = None) -> dict:
    """Write `<out_dir>/index` (index folder) and `<lake_root or out_dir/lake>/images`; return
    the ground truth (rows' scenes, the planted ids) also saved as `<out_dir>/truth.json`."""
    from deltalake import write_deltalake

    from laion_spark.config import IndexConfig
    from laion_spark.demo.scenes import Scene, describe_scene, random_scene, render_scene
    from laion_spark.index.build import build_local
    from laion_spark.index.core import encode_embeddings
    from laion_spark.score.preprocess import decode_image, resize_and_crop
    from laion_spark.serve.encoders import get_encoder

    rng = random.Random(f"serve-demo:{seed}")
    clip_dir = os.path.abspath(clip_dir)
    mclip_dir = os.path.join(clip_dir, "multilingual")
    text_model = mclip_dir if os.path.isdir(mclip_dir) else None
    enc = get_encoder(clip_dir, text_model, "cpu")

    scenes: list[Scene] = []
    for shape, color in TARGETS:
        for _ in range(TARGET_ROWS):
            bg = rng.choice([b for b in ("white", "grey", "black", "beige") if b != color])
            scenes.append(Scene(shape, color, bg, rng.randint(1, 4)))
    while len(scenes) < len(TARGETS) * TARGET_ROWS + n_random:
        s = random_scene(rng)
        if (s.shape, s.color) not in TARGETS:
            scenes.append(s)
    rows = []
    for i, s in enumerate(scenes):
        lang = rng.choice(("en", "en", "de", "fr", "ja", "es"))
        img = render_scene(s, (256, 192), random.Random(f"{seed}:{i}"))
        rows.append({"scene": s, "lang": lang, "caption": describe_scene(s, lang, rng),
                     "image": _jpeg(img), "url": f"http://shapes.example/img/{i}.jpg",
                     "punsafe": round(rng.uniform(0.0, 0.3), 4)})
    # Planted rows. Near-duplicate: target 0's picture re-encoded at another quality under
    # another URL. Duplicate URL: target 1's URL again with another caption. Unsafe: a target
    # 2 scene tagged punsafe 0.99.
    base = rows[0]
    near = dict(base, url="http://mirror.example/copy-of-0.jpg",
                image=_jpeg(decode_image(base["image"]), 60), caption=base["caption"] + " (copy)")
    dup = dict(rows[TARGET_ROWS], caption=describe_scene(rows[TARGET_ROWS]["scene"], "en"))
    unsafe = dict(rows[2 * TARGET_ROWS], url="http://shapes.example/img/unsafe.jpg",
                  punsafe=0.99, image=_jpeg(render_scene(rows[2 * TARGET_ROWS]["scene"],
                                                         (256, 192), random.Random("unsafe"))))
    rows += [near, dup, unsafe]
    planted = {"near_duplicate_of_0": len(rows) - 3, "duplicate_url_of": TARGET_ROWS,
               "duplicate_url": len(rows) - 2, "unsafe": len(rows) - 1}

    crops = np.stack([resize_and_crop(decode_image(r["image"]), enc.models.spec) for r in rows])
    img_emb = np.concatenate([enc.models.embed_images(crops[a:a + 64]).cpu().numpy()
                              for a in range(0, len(crops), 64)])
    txt_emb = np.zeros_like(img_emb)
    for multi in (False, True):
        idx = [i for i, r in enumerate(rows) if (r["lang"] != "en") == multi]
        if idx:
            use_m = multi and enc.has_mclip
            txt_emb[idx] = enc.models.embed_texts([rows[i]["caption"] for i in idx],
                                                  multilingual=use_m).cpu().numpy()
    sims = (img_emb * txt_emb).sum(axis=1)
    n = len(rows)
    uids = np.arange(1_000_001, 1_000_001 + n, dtype=np.int64)
    wm = np.array([round(rng.uniform(0, 0.4), 4) for _ in range(n)], dtype=np.float32)
    table = pa.table({
        "uid": pa.array(uids), "url": [r["url"] for r in rows],
        "text": [r["caption"] for r in rows],
        "language": [r["lang"] for r in rows],
        "language_group": [LANG_GROUP[r["lang"]] for r in rows],
        "width": pa.array([256] * n, pa.int32()), "height": pa.array([192] * n, pa.int32()),
        "image_embedding": encode_embeddings(img_emb),
        "text_embedding": encode_embeddings(txt_emb),
        "similarity": pa.array(sims.astype(np.float32)),
        "punsafe": pa.array(np.array([r["punsafe"] for r in rows], dtype=np.float32)),
        "pwatermark": pa.array(wm),
    })
    index_dir = os.path.join(out_dir, "index")
    icfg = IndexConfig(recall_queries=50, latency_target_ms=50.0, index_key="IVF8,Flat")
    build_local(table, index_dir, icfg, n_parts=2)
    # The index stage's coming metadata columns (language, language_group) and model.json.
    meta_path = os.path.join(index_dir, "metadata.parquet")
    meta = pq.read_table(meta_path)
    for col in ("language", "language_group"):  # the index stage now carries them itself
        if col not in meta.column_names:
            meta = meta.append_column(col, table.column(col))
    pq.write_table(meta, meta_path)
    with open(os.path.join(index_dir, "model.json"), "w") as f:
        json.dump({"clip_model": clip_dir, "text_model": text_model, "dim": int(enc.dim)}, f)

    lake = lake_root or os.path.join(out_dir, "lake")
    images = pa.table({
        "uid": pa.array(uids), "url": [r["url"] for r in rows],
        "status": ["success"] * n, "image": pa.array([r["image"] for r in rows], pa.binary()),
        "image_format": ["jpeg"] * n,
    })
    write_deltalake(os.path.join(lake, "images"), images, mode="overwrite")
    truth = {"rows": [{"id": i, "shape": r["scene"].shape, "color": r["scene"].color,
                       "count": r["scene"].count, "background": r["scene"].background,
                       "lang": r["lang"], "caption": r["caption"], "url": r["url"]}
                      for i, r in enumerate(rows)],
             "planted": planted, "targets": TARGETS, "index": index_dir, "lake": lake,
             "clip_model": clip_dir, "text_model": text_model}
    with open(os.path.join(out_dir, "truth.json"), "w") as f:
        json.dump(truth, f)
    log.info("serve demo index: %d rows in %s, images in %s", n, index_dir, lake)
    return truth
