"""Pure text functions for `prepare`: normalization, wiki markup stripping, quality signals, dedup keys.

Everything here takes text (and metadata) and returns text, numbers or a verdict; nothing reads files
or keeps state, so each function is tested on its own and runs the same in any worker process. The
common case (clean ASCII-ish text) is kept cheap: each pass first checks, with one C-level scan,
whether it has anything to do.
"""

from __future__ import annotations

import hashlib
import operator
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

# C0 and C1 controls except tab and newline (carriage returns are handled with line endings)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Unicode spaces that are not ASCII space; zero-width ones go, the others become a plain space
_ODD_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_ZERO_WIDTH = re.compile(r"[\u200b\ufeff]")
_TRAILING = re.compile(r"[ \t]+(?=\n|\Z)")
_BLANK_RUNS = re.compile(r"\n{3,}")
_PLAIN_ASCII = bytes(range(0x20, 0x7F)) + b"\t\n"


def _unusual(text: str) -> str:
    """The characters of `text` that are not printable ASCII, tab or newline (usually few or none).

    Found with two C-level passes, far cheaper than a regex over the whole text."""
    rest = text.encode("utf-8", "surrogatepass").translate(None, _PLAIN_ASCII)
    return rest.decode("utf-8", "surrogatepass") if rest else ""


def normalize(text: str) -> str:
    """NFC, no control characters, LF line endings, no trailing spaces, at most one blank line in a row.

    Unicode text stays Unicode: nothing is folded to ASCII and letters keep their accents.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    odd = _unusual(text)
    if odd:
        if not odd.isascii() and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if _ODD_SPACE.search(odd):
            text = _ODD_SPACE.sub(" ", text)
        if _ZERO_WIDTH.search(odd):
            text = _ZERO_WIDTH.sub("", text)
        if _CONTROL.search(odd):
            text = _CONTROL.sub("", text)
    for _ in range(8):  # str.replace is much faster than a regex trying every space; runs are short
        if " \n" not in text and ("\t" not in text or "\t\n" not in text):
            break
        text = text.replace(" \n", "\n").replace("\t\n", "\n")
    else:
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n \t")


# ---- wiki markup -------------------------------------------------------------------------------
_WIKI_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>", re.I), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.I | re.S), ""),
    (re.compile(r"\[\[(?:Category|File|Image|Media):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]"), r"\1"),  # [[target|label]] → label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),  # [url label] → label
    (re.compile(r"\[(?:\d{1,3}|[a-z]|citation needed|clarification needed|note \d+)\]", re.I), ""),
    (re.compile(r"'{2,5}"), ""),  # bold/italic quotes
    (re.compile(r"^[ \t]*(=+)[ \t]*(.+?)[ \t]*\1[ \t]*$", re.M), r"\2"),  # == Heading == → Heading
    (re.compile(r"^ ?(?:= )+(.+?)(?: =)+ ?$", re.M), r"\1"),  # WikiText's " = = Heading = = "
    (re.compile(r"</?[a-zA-Z][^>]*>"), ""),  # other HTML tags: keep their text
    (re.compile(r"^ (?=\S)", re.M), ""),  # WikiText starts every line with a space
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"^\{\|.*?^\|\}[ \t]*$\n?", re.M | re.S)
_WIKITEXT_AT = re.compile(r" @([-.,])@ ")


def strip_wiki(text: str) -> str:
    """Remove the markup that dumps leave behind; headings stay, as plain lines."""
    if "{{" in text:
        for _ in range(10):  # templates nest: remove innermost ones until none are left
            text, n = _TEMPLATE.subn("", text)
            if not n:
                break
    if "{|" in text:
        text = _TABLE.sub("", text)
    for pattern, repl in _WIKI_RULES:
        text = pattern.sub(repl, text)
    if " @" in text:
        text = _WIKITEXT_AT.sub(r"\1", text)  # WikiText's tokenized "3 @.@ 5", "well @-@ known"
    return text


# ---- quality signals ---------------------------------------------------------------------------
_SPACE_BYTES = b" \t\n\r\x0b\x0c"
_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))


def alpha_fraction(text: str) -> float:
    """Letters among the non-space characters (1.0 for text without any)."""
    raw = text.encode("utf-8", "surrogatepass")
    spaces = len(raw) - len(raw.translate(None, _SPACE_BYTES))
    letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
    visible = len(text) - spaces
    if not raw.isascii():  # only the few non-ASCII characters are looked at one by one
        other = raw.translate(None, _PLAIN_ASCII).decode("utf-8", "surrogatepass")
        letters += sum(map(str.isalpha, other))
        visible -= sum(map(str.isspace, other))
    return letters / visible if visible > 0 else 1.0


def dup_line_fraction(text: str) -> float:
    """Fraction of non-empty lines that repeat an earlier line (Gopher's duplicate-line signal).

    Lines are compared as they are; after `normalize` a blank line is an empty one."""
    lines = text.split("\n")
    n = len(lines) - lines.count("")
    if not n:
        return 0.0
    distinct = set(lines)
    return 1.0 - (len(distinct) - ("" in distinct)) / n


def dup_ngram_fraction(text: str, n: int = 5) -> float:
    """Fraction of word characters that sit inside a word n-gram occurring more than once (Gopher)."""
    words = text.split()
    if len(words) < n:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n)), strict=False))
    counts = Counter(grams)
    covered = np.zeros(len(words), dtype=bool)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = True
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = int(lengths.sum())
    return float(lengths[covered].sum()) / total if total else 0.0


def max_line_length(text: str) -> int:
    return max(map(len, text.split("\n")), default=0)


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
_CONDITION = re.compile(r"^\s*([\w.\-]+)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")


@dataclass(frozen=True)
class MetaCondition:
    """`field OP value`, e.g. `language_score >= 0.65` or `language == 'en'`."""

    field: str
    op: str
    value: Any

    @classmethod
    def parse(cls, expr: str) -> MetaCondition:
        m = _CONDITION.match(expr)
        if not m:
            raise ValueError(f"expected `field OP value` with OP one of {' '.join(_OPS)}, got {expr!r}")
        name, op, raw = m.groups()
        if raw[:1] in "'\"" and raw[-1:] == raw[:1] and len(raw) >= 2:
            value: Any = raw[1:-1]
        else:
            try:
                value = float(raw)
            except ValueError:
                value = raw
        return cls(name, op, value)

    def __call__(self, meta: dict) -> bool:
        got = meta.get(self.field)
        if got is None:
            return False
        try:
            return _OPS[self.op](float(got) if isinstance(self.value, float) else got, self.value)
        except (TypeError, ValueError):
            return False

    def __str__(self) -> str:
        return f"{self.field} {self.op} {self.value!r}"


def build_filters(cfg: Any) -> list[tuple[str, Callable[[str, dict], bool]]]:
    """(name, keep?) for each quality filter a PrepareConfig turns on, cheapest first."""
    out: list[tuple[str, Callable[[str, dict], bool]]] = []
    if cfg.min_chars:
        out.append(("min_chars", lambda t, m: len(t) >= cfg.min_chars))
    if cfg.max_chars:
        out.append(("max_chars", lambda t, m: len(t) <= cfg.max_chars))
    for expr in cfg.meta_filters:
        cond = MetaCondition.parse(expr)
        out.append((f"meta: {cond}", lambda t, m, c=cond: c(m)))
    if cfg.max_line_chars:
        out.append(("max_line_chars", lambda t, m: len(t) <= cfg.max_line_chars
                    or max_line_length(t) <= cfg.max_line_chars))
    if cfg.min_alpha_frac:
        out.append(("min_alpha_frac", lambda t, m: alpha_fraction(t) >= cfg.min_alpha_frac))
    if cfg.max_dup_line_frac < 1.0:
        out.append(("max_dup_line_frac", lambda t, m: dup_line_fraction(t) <= cfg.max_dup_line_frac))
    if cfg.max_dup_ngram_frac < 1.0:
        out.append(("max_dup_ngram_frac",
                    lambda t, m: dup_ngram_fraction(t, cfg.dup_ngram) <= cfg.max_dup_ngram_frac))
    return out


# ---- dedup keys --------------------------------------------------------------------------------
def dedup_key(text: str) -> int:
    """64-bit key of the (normalized) text with case ignored: exact dedup and the train/val split."""
    # ASCII text (most of it): lower() is casefold() there, and the str's own bytes are its UTF-8
    folded = text.lower().encode("ascii") if text.isascii() else text.casefold().encode("utf-8", "surrogatepass")
    return xxhash.xxh3_64_intdigest(folded) or 1  # 0: an empty slot


def _shingle_hash(shingle: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(shingle, digest_size=4).digest(), "little")


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) that datasketch's MinHashLSH picks for this Jaccard threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def minhash_bands(text: str, num_perm: int, bands: int, rows: int, ngram: int = 5, seed: int = 1) -> np.ndarray:
    """One 64-bit key per LSH band of the text's MinHash over word n-grams (datasketch's MinHash).

    Two texts share a band key with the probability the (bands, rows) curve gives for their Jaccard
    similarity; the key mixes in the band number, so all bands can live in one table.
    """
    from datasketch import MinHash

    words = text.casefold().split()
    shingles = {" ".join(words[i:i + ngram]).encode() for i in range(max(len(words) - ngram + 1, 1))}
    mh = MinHash(num_perm=num_perm, seed=seed, hashfunc=_shingle_hash)
    mh.update_batch(shingles)
    values = np.asarray(mh.hashvalues, dtype=np.uint64)
    out = np.empty(bands, dtype=np.uint64)
    for b in range(bands):
        chunk = values[b * rows:(b + 1) * rows].tobytes() + b.to_bytes(2, "little")
        out[b] = int.from_bytes(hashlib.blake2b(chunk, digest_size=8).digest(), "little") or 1
    return out
