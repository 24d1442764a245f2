"""Score stage end to end on Spark: the demo web's images scored with the demo CLIP (trained here),
checked against the ground truth and against plain `transformers` calls; model loads counted per
executor process; a corrupt image gets an error row; a re-run commits nothing."""
from __future__ import annotations

import datetime as dt
import hashlib
import io
from pathlib import Path
from urllib.parse import urlsplit

import mmh3
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from laion_spark.config import Config, LakeConfig
from laion_spark.score.demo_model import _auc, _letterbox
from laion_spark.score.scorer import binary_to_embeddings
from laion_spark.spark import dataframe_from_arrow

N_PAGES = 80
ROWS_PER_SHARD = 40


@pytest.fixture(scope="module")
def demo_clip(tmp_path_factory):
    """Trained here (about a minute); LAION_SPARK_TEST_DEMO_CLIP names a folder to train into once
    and reuse across runs."""
    import os

    from laion_spark.score.demo_model import train_demo_clip

    folder = os.environ.get("LAION_SPARK_TEST_DEMO_CLIP") or tmp_path_factory.mktemp("demo-clip")
    return train_demo_clip(folder, seed=0)


def _images_rows(web) -> list[dict]:
    """What the download stage would write for the demo web: each extractable, downloadable image
    letterboxed to 256 px JPEG, plus one corrupt success row and one failed download."""
    gt = web.ground_truth()
    rows, seen = [], set()
    for entry in gt["images"]:
        if not (entry["extractable"] and entry["expected_download"] == "success"):
            continue
        key = (entry["url"], entry["alt"])
        if key in seen:
            continue
        seen.add(key)
        path = web.site_dir / urlsplit(entry["final_url"] or entry["url"]).path.lstrip("/")
        original = Image.open(path).convert("RGB")
        buf = io.BytesIO()
        _letterbox(original, 256).save(buf, "JPEG", quality=95)
        rows.append(_row(entry["url"], entry["alt"], entry["language"], "success", buf.getvalue(), original.size))
    rows.append(_row("http://127.0.0.1:9/broken.jpg", "a red circle on a white background", "en", "success",
                     b"\xff\xd8\xff\xe0 truncated", (10, 10)))
    rows.append(_row("http://127.0.0.1:9/gone.jpg", "two blue stars on a grey background", "en", "failed",
                     None, None))
    for i, row in enumerate(rows):
        row["shard"] = f"{i // ROWS_PER_SHARD:05d}"
    return rows


def _row(url, text, language, status, image, size):
    return {
        "uid": mmh3.hash64(url + text)[0], "url": url, "text": text, "language": language,
        "language_group": "en" if language == "en" else "multi", "status": status,
        "error": None if status == "success" else "http_404", "http_status": 200 if status == "success" else 404,
        "image": image, "image_format": "jpg" if image else None, "width": 256 if image else None,
        "height": 256 if image else None, "original_width": size[0] if size else None,
        "original_height": size[1] if size else None,
        "image_bytes_sha256": hashlib.sha256(image).hexdigest() if image else None,
        "downloaded_at": dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc), "shard": None,
    }


@pytest.fixture(scope="module")
def scored(spark, demo_clip, tmp_path_factory):
    from laion_spark.demo.web import generate_demo_web
    from laion_spark.lake import Lake
    from laion_spark.score.job import run_score

    root = tmp_path_factory.mktemp("score-e2e")
    web = generate_demo_web(root / "web", "http://127.0.0.1:9", seed=0, n_pages=N_PAGES)
    rows = _images_rows(web)
    lake = Lake(spark, LakeConfig(root=str(root / "lake")))
    lake.append("images", dataframe_from_arrow(spark, pa.Table.from_pylist(rows)), stage="download",
                units=sorted({r["shard"] for r in rows}))
    cfg = Config()
    cfg.score.clip_model = demo_clip.clip_path
    cfg.score.multilingual_text_model = demo_clip.multilingual_path
    cfg.score.batch_size = 32
    cfg.score.partitions = 4
    cfg.score.device = "cpu"
    cfg.score.load_log_dir = str(root / "loads")
    summary = run_score(spark, cfg, lake)
    pairs = lake.read_arrow("pairs").to_pylist()
    return {"web": web, "rows": rows, "lake": lake, "cfg": cfg, "summary": summary, "pairs": pairs,
            "loads": root / "loads", "demo_clip": demo_clip}


def test_matched_pairs_score_above_mismatched(scored):
    truth = {(e["url"], e["alt"]): e["matches"] for e in scored["web"].ground_truth()["images"]}
    pairs = [p for p in scored["pairs"] if p["score_error"] is None]
    pos = np.array([p["similarity"] for p in pairs if truth[(p["url"], p["text"])]])
    neg = np.array([p["similarity"] for p in pairs if not truth[(p["url"], p["text"])]])
    assert len(pos) > 50 and len(neg) > 30
    auc = _auc(pos, neg)
    # The demo CLIP's training is bit-reproducible on one CPU model, not across CPU models: another
    # machine trains a model as different as another seed does. Over seeds 0-3 at 800 steps this
    # AUC measured 0.941-0.954 and the held-out AUC 0.963-0.984 (score/README.md); at 500 steps
    # seed 1 gave 0.919 and seed 2 a held-out 0.952, which failed bars of 0.94/0.95. The bars sit
    # below every run measured; a pipeline bug (rows paired with the wrong embeddings, wrong
    # preprocessing) lands near 0.5, and exactness is test_embeddings_equal_plain_transformers's.
    assert auc >= 0.92, f"ROC AUC {auc:.3f}"
    assert scored["demo_clip"].heldout_auc >= 0.94, f"held-out AUC {scored['demo_clip'].heldout_auc:.3f}"
    kept = np.mean([p["passes_filter"] for p in pairs if truth[(p["url"], p["text"])]])
    dropped = np.mean([not p["passes_filter"] for p in pairs if not truth[(p["url"], p["text"])]])
    assert kept >= 0.9, f"passes_filter keeps only {kept:.0%} of matching pairs"
    assert dropped >= 0.5, f"passes_filter drops only {dropped:.0%} of mismatching pairs"
    multi = [p for p in pairs if p["language_group"] == "multi"]
    assert multi and all(p["text_model"] == scored["cfg"].score.multilingual_text_model for p in multi)


def test_embeddings_equal_plain_transformers(scored):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    from laion_spark.score.mclip import MultilingualCLIP

    cfg = scored["cfg"].score
    model = CLIPModel.from_pretrained(cfg.clip_model).eval()
    tok = AutoTokenizer.from_pretrained(cfg.clip_model)
    proc = CLIPImageProcessorPil.from_pretrained(cfg.clip_model)
    mclip = MultilingualCLIP.from_pretrained(cfg.multilingual_text_model).eval()
    images = {r["uid"]: r["image"] for r in scored["rows"] if r["image"]}
    pairs = [p for p in scored["pairs"] if p["score_error"] is None][:48]
    with torch.no_grad():
        pixels = proc(images=[Image.open(io.BytesIO(images[p["uid"]])) for p in pairs], return_tensors="pt")
        img = model.get_image_features(**pixels)
        img = torch.nn.functional.normalize(getattr(img, "pooler_output", img), dim=-1).numpy()
        want_txt = []
        for p in pairs:
            enc = tok([p["text"]], return_tensors="pt")
            if p["language_group"] == "en":
                t = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                t = getattr(t, "pooler_output", t)
            else:
                t = mclip(enc["input_ids"], enc["attention_mask"])
            want_txt.append(torch.nn.functional.normalize(t, dim=-1)[0].numpy())
    got_img = binary_to_embeddings([p["image_embedding"] for p in pairs])
    got_txt = binary_to_embeddings([p["text_embedding"] for p in pairs])
    np.testing.assert_allclose(got_img, img, atol=2e-2)
    np.testing.assert_allclose(got_txt, np.stack(want_txt), atol=2e-3)
    np.testing.assert_allclose([p["similarity"] for p in pairs], (img * np.stack(want_txt)).sum(1), atol=2e-2)


def test_model_loaded_once_per_executor_process(scored):
    files = sorted(scored["loads"].glob("loads-*.txt"))
    loads_per_process = [len(f.read_text().splitlines()) for f in files]
    assert files and all(n == 1 for n in loads_per_process), loads_per_process
    # 4 partitions scored by fewer processes than partitions: later tasks reused the cached model.
    assert len(files) < scored["cfg"].score.partitions


def test_corrupt_image_gets_error_row_and_failed_download_is_not_scored(scored):
    by_url = {p["url"]: p for p in scored["pairs"]}
    broken = by_url["http://127.0.0.1:9/broken.jpg"]
    assert "cannot decode image" in broken["score_error"]
    assert broken["passes_filter"] is False and broken["image_embedding"] is None
    assert "http://127.0.0.1:9/gone.jpg" not in by_url
    n_success = sum(r["status"] == "success" for r in scored["rows"])
    assert len(scored["pairs"]) == n_success == scored["summary"]["rows"]
    assert scored["summary"]["score_errors"] == 1
    assert "image" not in scored["pairs"][0]


def test_rerun_skips_scored_shards(spark, scored):
    from laion_spark.score.job import run_score

    lake = scored["lake"]
    version = lake.version("pairs")
    summary = run_score(spark, scored["cfg"], lake)
    assert summary["shards_scored"] == 0 and summary["shards_skipped"] == summary["shards"]
    assert lake.version("pairs") == version
