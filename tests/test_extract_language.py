"""The language labels are pinned: CLD3 (the `gcld3` module, from the `cld3-py` wheels) on 400
real alt texts gives the stored language, probability and reliability, and the extractor's
grouping follows from them. A change of the identifier's build or version that moves a label
shows here, not as a silent shift of the `en`/`multi`/`nolang` buckets."""
from __future__ import annotations

import json
from pathlib import Path

from laion_spark.extract.rules import LanguageIdentifier

PINNED = Path(__file__).parent / "data" / "cld3_labels.json"


def test_cld3_labels_on_real_alt_texts_are_the_pinned_ones():
    rows = json.loads(PINNED.read_text(encoding="utf-8"))["labels"]
    assert len(rows) == 400 and sum(not text.isascii() for text, *_ in rows) == 100
    lang = LanguageIdentifier(min_prob=0.5)
    lang._cache.clear()
    moved = []
    for text, language, prob, reliable in rows:
        res = lang.detector.FindLanguage(text=text)
        if (res.language, bool(res.is_reliable)) != (language, reliable) or abs(res.probability - prob) > 1e-6:
            moved.append((text, (language, prob, reliable), (res.language, res.probability, res.is_reliable)))
            continue
        group = ("en" if language == "en" else "multi") if reliable and prob >= 0.5 and language != "und" \
            else "nolang"
        assert lang.identify(text) == (language, res.probability, group)
    assert not moved, f"{len(moved)} of {len(rows)} labels moved, e.g. {moved[:5]}"
    assert len({language for _t, language, _p, _r in rows}) > 20  # (many languages, not one)
