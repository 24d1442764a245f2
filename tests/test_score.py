"""Score stage without Spark: preprocessing vs CLIPImageProcessor, scorer vs plain transformers,
bad images, safety heads, model bundle and cache."""
from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from laion_spark.config import ScoreConfig
from laion_spark.score import models as score_models
from laion_spark.score.preprocess import PreprocessSpec, preprocess_bytes, resize_and_crop, to_model_input
from laion_spark.score.safety import NSFWHead, build_safety_heads, load_linear_probe, load_nsfw_head
from laion_spark.score.scorer import ScoreSettings, binary_to_embeddings, pairs_schema, score_record_batches


def _jpeg(seed: int, size=(96, 72)) -> bytes:
    from laion_spark.demo.scenes import random_scene, render_scene

    rng = random.Random(seed)
    img = render_scene(random_scene(rng), size, rng)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight CLIP with the demo tokenizer and a 32 px processor, saved with save_pretrained."""
    from transformers import CLIPImageProcessorPil

    from laion_spark.score.demo_model import build_demo_clip, build_demo_tokenizer

    out = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    tok = build_demo_tokenizer(vocab_size=600)
    build_demo_clip(len(tok), image_size=32, patch_size=8, hidden=64).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return str(out)


def _images_batch(n: int, corrupt: tuple[int, ...] = (), failed: tuple[int, ...] = ()) -> pa.RecordBatch:
    rows = []
    for i in range(n):
        status = "failed" if i in failed else "success"
        image = None if status == "failed" else (b"\xff\xd8 not a jpeg" if i in corrupt else _jpeg(i))
        rows.append({"uid": i, "url": f"http://x/{i}.jpg", "text": f"two red circles on a white background {i}",
                     "language": "en" if i % 2 == 0 else "de", "language_group": "en" if i % 2 == 0 else "multi",
                     "status": status, "error": None if status == "success" else "http 404", "image": image,
                     "shard": "00000"})
    return pa.RecordBatch.from_pylist(rows)


def test_preprocess_matches_clip_image_processor():
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil()  # CLIP's 224 defaults
    spec = PreprocessSpec()
    for i, size in enumerate([(320, 240), (240, 320), (256, 256), (100, 60), (500, 200)]):
        data = _jpeg(i, size)
        ours = to_model_input([preprocess_bytes(data, spec)[0]], spec)
        ref = proc(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        # Same resize and crop; the processor resizes in float, we in uint8: < 1 grey level apart.
        assert (ours - ref).abs().mean() < 0.01
        assert (ours - ref).abs().max() < 0.05


def test_spec_from_saved_processor(tiny_clip_dir):
    spec = PreprocessSpec.from_pretrained_dir(tiny_clip_dir)
    assert (spec.resize, spec.crop) == (32, 32)
    assert resize_and_crop(Image.new("RGB", (90, 40)), spec).shape == (32, 32, 3)


def test_scorer_embeddings_equal_plain_transformers(tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    cfg = ScoreConfig(clip_model=tiny_clip_dir, batch_size=4, device="cpu", dtype="float32")
    bundle = score_models.bundle_from_config(cfg)
    models = score_models.get_models(bundle.key, lambda: bundle, "cpu", "float32")
    batch = _images_batch(6)
    out = pa.Table.from_batches(list(score_record_batches([batch], models, ScoreSettings.from_config(cfg))))
    assert out.num_rows == 6 and out.schema == pairs_schema(batch.schema)

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip_dir)
    proc = CLIPImageProcessorPil.from_pretrained(tiny_clip_dir)
    images = [Image.open(io.BytesIO(b)) for b in batch.column("image").to_pylist()]
    with torch.no_grad():
        img = model.get_image_features(**proc(images=images, return_tensors="pt"))
        txt = model.get_text_features(**tok(batch.column("text").to_pylist(), padding=True, return_tensors="pt"))
    img = torch.nn.functional.normalize(getattr(img, "pooler_output", img), dim=-1).numpy()
    txt = torch.nn.functional.normalize(getattr(txt, "pooler_output", txt), dim=-1).numpy()
    got_img = binary_to_embeddings(out.column("image_embedding").to_pylist())
    got_txt = binary_to_embeddings(out.column("text_embedding").to_pylist())
    np.testing.assert_allclose(got_img, img, atol=2e-2)  # float16 storage + uint8 vs float resize
    np.testing.assert_allclose(got_txt, txt, atol=2e-3)  # float16 storage only
    np.testing.assert_allclose(np.linalg.norm(got_img, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(out.column("similarity").to_numpy(), (img * txt).sum(1), atol=2e-2)
    assert set(out.column("clip_model").to_pylist()) == {tiny_clip_dir}


def test_bad_images_get_an_error_and_failed_downloads_are_not_scored(tiny_clip_dir):
    cfg = ScoreConfig(clip_model=tiny_clip_dir, batch_size=3, device="cpu", dtype="float32")
    bundle = score_models.bundle_from_config(cfg)
    models = score_models.get_models(bundle.key, lambda: bundle, "cpu", "float32")
    batch = _images_batch(7, corrupt=(1, 4), failed=(2,))
    out = pa.Table.from_batches(list(score_record_batches([batch], models, ScoreSettings.from_config(cfg))))
    rows = {r["uid"]: r for r in out.to_pylist()}
    assert sorted(rows) == [0, 1, 3, 4, 5, 6]  # the failed download is not in pairs
    for uid in (1, 4):
        assert "cannot decode image" in rows[uid]["score_error"]
        assert rows[uid]["image_embedding"] is None and rows[uid]["similarity"] is None
        assert rows[uid]["passes_filter"] is False and rows[uid]["text_embedding"] is not None
    for uid in (0, 3, 5, 6):
        assert rows[uid]["score_error"] is None and len(rows[uid]["image_embedding"]) == 2 * models.dim
        assert 0.0 <= rows[uid]["punsafe"] <= 1.0 and 0.0 <= rows[uid]["pwatermark"] <= 1.0


def test_models_are_cached_per_process(tiny_clip_dir, tmp_path):
    cfg = ScoreConfig(clip_model=tiny_clip_dir)
    bundle = score_models.bundle_from_config(cfg)
    calls = []

    def getter():
        calls.append(1)
        return bundle

    a = score_models.get_models(bundle.key + "-cache", getter, "cpu", "float32", str(tmp_path))
    b = score_models.get_models(bundle.key + "-cache", getter, "cpu", "float32", str(tmp_path))
    assert a is b and len(calls) == 1
    assert len(list(tmp_path.glob("loads-*.txt"))) == 1


def test_nsfw_head_loads_laion_state_dict_layout(tmp_path):
    torch.manual_seed(0)
    for dim, n_linear in ((768, 4), (512, 3)):
        sd = {"norm.mean": torch.randn(dim), "norm.variance": torch.rand(dim) + 0.5}
        sizes = [dim, 64, 512, 256, 1] if dim == 768 else [dim, 32, 32, 1]
        for k in range(n_linear):
            sd[f"linear_{k + 1}.weight"] = torch.randn(sizes[k + 1], sizes[k]) * 0.05
            sd[f"linear_{k + 1}.bias"] = torch.zeros(sizes[k + 1])
        path = tmp_path / f"nsfw_{dim}.pth"
        torch.save(sd, path)
        head = load_nsfw_head(str(path), dim)
        x = torch.nn.functional.normalize(torch.randn(5, dim), dim=-1)
        ref = NSFWHead(dim)
        ref.load_state_dict(sd)
        ref.eval()
        y = head(x)
        assert y.shape == (5,) and torch.all((y >= 0) & (y <= 1))
        torch.testing.assert_close(y, ref(x))
    with pytest.raises(RuntimeError):  # a head for the wrong embedding size is refused
        load_nsfw_head(str(tmp_path / "nsfw_512.pth"), 768)


def test_linear_probe_and_zero_shot_heads(tmp_path):
    dim = 16
    torch.save({"weight": torch.ones(1, dim), "bias": torch.zeros(1)}, tmp_path / "wm.pt")
    probe = load_linear_probe(str(tmp_path / "wm.pt"), dim)
    x = torch.ones(2, dim) / 4
    assert torch.allclose(probe(x), torch.sigmoid(torch.tensor([4.0, 4.0])))
    prompts = torch.nn.functional.normalize(torch.randn(40, dim), dim=-1)
    heads = build_safety_heads(lambda texts: prompts[: len(texts)], dim, torch.device("cpu"),
                               watermark=(tmp_path / "wm.pt").read_bytes())
    assert heads.kind["punsafe"] == "zero-shot prompts" and heads.kind["pwatermark"].startswith("trained")
    nsfw, wm = heads.image_tags(torch.nn.functional.normalize(torch.randn(3, dim), dim=-1))
    assert nsfw.shape == (3,) and np.all((nsfw >= 0) & (nsfw <= 1))
