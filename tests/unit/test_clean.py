from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.clean import (
    MetaCondition,
    alpha_fraction,
    build_filters,
    dedup_key,
    dup_line_fraction,
    dup_ngram_fraction,
    lsh_params,
    max_line_length,
    minhash_bands,
    normalize,
    strip_wiki,
)
from lmforge.config import PrepareConfig
from lmforge.dedup import KeySet

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "samples"


def test_normalize_basics() -> None:
    assert normalize("cafe\u0301") == "café"  # NFC
    assert normalize("a\x00b\x07c\x1bd\x7fe\x85f") == "abcdef"  # C0/C1 controls
    assert normalize("one\r\ntwo\rthree") == "one\ntwo\nthree"
    assert normalize("line  \nnext\t\n\n\n\n\nlast   ") == "line\nnext\n\nlast"
    assert normalize("a\u00a0b\u2009c\u3000d") == "a b c d"
    assert normalize("zero\u200bwidth\ufeff") == "zerowidth"
    assert normalize("\n\n  indented\n") == "indented"
    assert normalize("  keep\tinner  spaces") == "keep\tinner  spaces"


def test_normalize_keeps_unicode() -> None:
    text = "Ça va? naïve — «quotes» 中文字符 日本語 한국어 🎉🚀 👩‍👩‍👧 مرحبا Ωμέγα"
    assert normalize(text) == text  # no ASCII folding, emoji joiners kept


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_normalize_idempotent(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    assert "\r" not in once and "\n\n\n" not in once and " \n" not in once


def test_strip_wiki_markup() -> None:
    raw = ("'''Paris''' is the capital<ref name=\"a\">Some source</ref> of [[France|the French Republic]].[1]\n"
           "{{Infobox city|name={{lang|fr|Paris}}|pop=2M}}It has [[museum]]s.<ref name=b/>[citation needed]\n"
           "== History ==\nFounded early.<!-- hidden -->\n"
           "{| class=\"wikitable\"\n|-\n| a || b\n|}\n"
           "[[Category:Capitals in Europe]]\n[[File:Paris.jpg|thumb|The [[Seine]]]]\nEnd.")
    out = strip_wiki(raw)
    assert "Paris is the capital of the French Republic." in out
    assert "It has museums." in out
    for gone in ("<ref", "{{", "}}", "[1]", "citation needed", "Category", "File:", "wikitable", "hidden", "'''"):
        assert gone not in out, gone
    assert "\nHistory\n" in out  # the heading survives as a plain line
    assert normalize(out).endswith("End.")


def test_strip_wiki_on_wikitext_sample() -> None:
    path = SAMPLES / "wikitext2_test_sample.txt"
    if not path.is_file():
        pytest.skip("shared samples not present")
    text = path.read_text(encoding="utf-8")
    out = normalize(strip_wiki(text))
    assert out.startswith("Robert Boulter\n\nRobert Boulter is an English film")
    assert "\nCareer\n" in out and " @-@ " not in out and "guest-starring" in out
    assert " = = " not in out


def test_quality_signals() -> None:
    assert alpha_fraction("abc 12") == pytest.approx(3 / 5)
    assert alpha_fraction("日本語!") == pytest.approx(3 / 4)
    assert alpha_fraction("   ") == 1.0
    assert dup_line_fraction("a\nb\na\n\nb") == pytest.approx(0.5)
    assert dup_line_fraction("one line") == 0.0
    assert dup_ngram_fraction("the cat sat on the mat " * 4, 3) > 0.7
    assert dup_ngram_fraction("every word here is quite different from the rest of them", 3) == 0.0
    assert max_line_length("ab\nabcd\n") == 4


def test_meta_conditions() -> None:
    c = MetaCondition.parse("language_score >= 0.65")
    assert (c.field, c.op, c.value) == ("language_score", ">=", 0.65)
    assert c({"language_score": 0.7}) and not c({"language_score": 0.6}) and not c({})
    lang = MetaCondition.parse("language == 'en'")
    assert lang({"language": "en"}) and not lang({"language": "fr"})
    assert MetaCondition.parse("meta.n != 3")({"meta.n": 4})
    with pytest.raises(ValueError, match="field OP value"):
        MetaCondition.parse("no operator here")


def test_build_filters_order_and_verdicts() -> None:
    cfg = PrepareConfig(min_chars=5, max_chars=50, meta_filters=["score > 0.5"], max_line_chars=20,
                        min_alpha_frac=0.5, max_dup_line_frac=0.3, max_dup_ngram_frac=0.5, dup_ngram=2)
    filters = build_filters(cfg)
    assert [n for n, _ in filters] == ["min_chars", "max_chars", "meta: score > 0.5", "max_line_chars",
                                       "min_alpha_frac", "max_dup_line_frac", "max_dup_ngram_frac"]

    def verdict(text: str, meta: dict) -> str | None:
        return next((n for n, keep in filters if not keep(text, meta)), None)

    good = {"score": 0.9}
    assert verdict("a fine text", good) is None
    assert verdict("tiny", good) == "min_chars"
    assert verdict("x" * 60, good) == "max_chars"
    assert verdict("a fine text", {"score": 0.1}) == "meta: score > 0.5"
    assert verdict("a" * 30, good) == "max_line_chars"
    assert verdict("1234 5678 90!", good) == "min_alpha_frac"
    assert verdict("same\nsame\nsame", good) == "max_dup_line_frac"
    assert build_filters(PrepareConfig()) == []


def test_dedup_key() -> None:
    assert dedup_key("Hello World") == dedup_key("hello world") != dedup_key("hello  world!")
    assert dedup_key("") != 0 and 0 < dedup_key("x") < 2**64


def test_minhash_bands_find_near_duplicates() -> None:
    b, r = lsh_params(0.7, 64)
    assert b * r <= 64
    words = [f"w{i}" for i in range(300)]
    base = " ".join(words)
    near = " ".join(words[:290] + ["changed"] * 10)
    other = " ".join(reversed(words))
    kb, kn, ko = (minhash_bands(t, 64, b, r) for t in (base, near, other))
    assert kb.shape == (b,) and kb.dtype == np.uint64
    assert set(kb.tolist()) & set(kn.tolist())
    assert not set(kb.tolist()) & set(ko.tolist())
    assert np.array_equal(kb, minhash_bands(base, 64, b, r))  # deterministic across calls


def test_keyset_matches_a_python_set() -> None:
    rng = np.random.default_rng(0)
    ks, seen = KeySet(1 << 30), set()
    for i in range(40):
        keys = rng.integers(1, 3000 if i % 2 else 2**63, size=700, dtype=np.uint64)
        new, added = ks.add(keys)
        expect = []
        for k in keys.tolist():
            expect.append(k not in seen)
            seen.add(k)
        assert new.tolist() == expect
        assert len(added) == sum(expect)
    assert ks.count == len(seen) and ks.nbytes >= 16 * len(seen) // 2
    again = KeySet(1 << 30)
    again.replay(ks.table[ks.table != 0])
    assert not again.add(np.array(sorted(seen)[:50], dtype=np.uint64))[0].any()


def test_keyset_full_keeps_checking() -> None:
    ks = KeySet(1)  # the smallest table: 65536 slots, at most half used
    first = np.arange(1, 30001, dtype=np.uint64)
    assert ks.add(first)[0].all()
    new, added = ks.add(np.arange(20001, 60001, dtype=np.uint64))  # would pass half full: not inserted
    assert ks.full and len(added) == 0
    assert not new[:10000].any() and new[10000:].all()
    assert not ks.add(np.array([5, 25000], dtype=np.uint64))[0].any()
