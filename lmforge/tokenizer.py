"""Tokenizers: byte-level BPE (trained with rustbpe, encoded with tiktoken), raw bytes, or a
pretrained Hugging Face `tokenizer.json`.

A tokenizer directory holds `tokenizer.json` (Hugging Face format, the single source of truth for
the vocabulary), `tokenizer_config.json` (so `transformers` can load it) and `lmforge_tokenizer.json`
(kind, specials, fingerprint, what made it). Special tokens take the ids right after the ordinary
vocabulary; `encode` never turns special-token text into special ids.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import tiktoken

from lmforge import __version__
from lmforge.config import Recipe, TokenizerConfig
from lmforge.errors import ConfigError, DataError
from lmforge.fsutil import atomic_write_json, atomic_write_text, read_json

# GPT-4's split pattern (cl100k). Shard chunking relies on its line-boundary behaviour, see chunk_text.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
INFO_FILE = "lmforge_tokenizer.json"
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# Which special-token names play which role; the first one present wins.
ROLE_NAMES = {
    "bos": ("<|bos|>", "<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>"),
    "eos": ("<|eos|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]"),
}


def _byte_alphabet() -> list[str]:
    """GPT-2's byte → printable character table, the alphabet of byte-level tokenizer.json files."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    extra = iter(range(256, 512))  # the unprintable bytes move to U+0100.. in byte order
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """HF merges that make HF's BPE agree with tiktoken's rank-based merging.

    tiktoken joins any adjacent pair whose concatenation is a token, lowest rank first, so every
    split of a token into two tokens becomes a merge, ordered by the rank of the result.
    """
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = [p for p in pairs if p[0] in ranks and p[1] in ranks]
        merges.extend(sorted(pairs, key=lambda p: (ranks[p[0]], ranks[p[1]])))
    return merges


def _roles(specials: dict[str, int], explicit: dict[str, str] | None = None) -> dict[str, str]:
    roles = {k: v for k, v in (explicit or {}).items() if v in specials}
    for role, names in ROLE_NAMES.items():
        found = roles.get(role) or next((n for n in names if n in specials), None)
        roles.update({role: found} if found else {})
    return roles


class Tokenizer:
    """One tokenizer, whatever its kind; see the module docstring."""

    def __init__(self, kind: str, special_tokens: dict[str, int], *, ranks: dict[bytes, int] | None = None,
                 pattern: str = GPT4_PATTERN, hf: Any = None, roles: dict[str, str] | None = None,
                 meta: dict | None = None, chat_template: str | None = None) -> None:
        self.kind = kind
        self.chat_template = chat_template
        """Jinja source of the chat template (lmforge.chat_template) when the chat tokens were added."""
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        self.meta = dict(meta or {})
        self._ranks = ranks
        self._hf = hf
        self.roles = _roles(self.special_tokens, roles)
        self.bos_id, self.eos_id, self.pad_id = (self.special_tokens.get(self.roles.get(r, ""))
                                                 for r in ("bos", "eos", "pad"))
        self._id_bytes_cache: list[bytes] | None = None
        if hf is not None:
            hf.encode_special_tokens = True  # special-token text is ordinary text
            self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
            self._enc = None
            self._byte_level = (orjson.loads(hf.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
        else:
            assert ranks is not None
            self.vocab_size = len(ranks) + len(self.special_tokens)
            self._enc = tiktoken.Encoding(f"lmforge-{kind}", pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        self.fingerprint = self._fingerprint()

    # ---- identity -------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        h = hashlib.sha256(self.kind.encode())
        h.update(orjson.dumps(sorted(self.special_tokens.items(), key=lambda kv: kv[1])))
        if self._hf is not None:
            h.update(orjson.dumps(orjson.loads(self._hf.to_str()), option=orjson.OPT_SORT_KEYS))
        else:
            h.update(self.pattern.encode())
            for token, rank in sorted(self._ranks.items(), key=lambda kv: kv[1]):
                h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"

    # ---- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.kind == "byte":
            return list(_utf8(text))
        if self._enc is not None:
            return self._enc.encode_ordinary(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array, without building a Python list on the way (cheaper in bulk)."""
        if self._enc is not None and self.kind != "byte":
            try:  # special-token text stays ordinary text, as in encode_ordinary
                return self._enc.encode_to_numpy(text, disallowed_special=())
            except UnicodeEncodeError:  # lone surrogates: take the list path, which repairs them
                pass
        elif self.kind == "byte":
            return np.frombuffer(_utf8(text), dtype=np.uint8).astype(np.uint32)
        return np.array(self.encode(text), dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "byte":
            return [list(_utf8(t)) for t in texts]
        if self._hf is not None:
            return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]
        # tiktoken encodes without the GIL, so threads help; but encode_ordinary_batch pays a future per
        # text, more than a short document's encoding costs. One contiguous group per thread instead.
        enc = self._enc.encode_ordinary
        threads = min(os.cpu_count() or 1, 8, len(texts), 1 + sum(map(len, texts)) // 65536)
        if threads <= 1:
            return [enc(t) for t in texts]
        size = -(-len(texts) // threads)
        with ThreadPoolExecutor(threads) as pool:
            parts = pool.map(lambda group: [enc(t) for t in group],
                             [texts[i:i + size] for i in range(0, len(texts), size)])
            return [ids for part in parts for ids in part]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self._enc is not None:
            return self._enc.decode_bytes(ids)
        table = self._id_bytes()
        return b"".join(table[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        if self._hf is not None and not self._byte_level:
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            return self._hf.decode(ids, skip_special_tokens=False)
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """Each id's length in UTF-8 bytes (0 for special tokens): the denominator of bits-per-byte."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        if self._ranks is None:
            out[:] = [len(b) for b in self._id_bytes()]
        for token, i in (self._ranks or {}).items():
            out[i] = len(token)
        out[list(self.special_tokens.values())] = 0
        return out

    def chunk_text(self, text: str, max_chars: int) -> list[str]:
        """Pieces of about `max_chars` whose encodings concatenate to `encode(text)`.

        With GPT-4's pattern no regex piece spans a newline followed by a letter/digit/ASCII symbol,
        nor a visible character followed by a space (none looks behind), so cuts there are exact.
        Other tokenizers are cut only when a text is 4x over, before a space: their normalizers may
        treat a piece's start specially, so a cut can change a token there; it keeps memory bounded."""
        exact = self.kind != "pretrained" and self.pattern == GPT4_PATTERN
        if len(text) <= max_chars * (1 if exact else 4):
            return [text]
        pieces, start = [], 0
        while len(text) - start > max_chars:
            i = _next_cut(text, start + max_chars, newlines=exact)
            if i == -1:
                break
            pieces.append(text[start:i])
            start = i
        pieces.append(text[start:])
        return pieces

    # ---- chat --------------------------------------------------------------------------------------
    def with_special_tokens(self, names: Iterable[str]) -> Tokenizer:
        """A copy with the `names` it lacks added as special tokens, after every existing id."""
        new = [n for n in dict.fromkeys(names) if n not in self.special_tokens]
        meta = {**self.meta, "added_special_tokens": [*self.meta.get("added_special_tokens", []), *new]}
        if self._hf is None:
            specials = {**self.special_tokens, **{n: self.vocab_size + i for i, n in enumerate(new)}}
            return Tokenizer(self.kind, specials, ranks=self._ranks, pattern=self.pattern, roles=self.roles,
                             meta=meta, chat_template=self.chat_template)
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(self._hf.to_str())
        hf.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in new])
        specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        return Tokenizer(self.kind, specials, hf=hf, roles=self.roles, meta=meta, chat_template=self.chat_template)

    def with_chat_tokens(self) -> Tokenizer:
        """A copy with the chat template's role and end-of-turn tokens (and `<|bos|>` if it has no
        beginning-of-text token) and its `chat_template`; old ids keep their meaning."""
        from lmforge.chat_template import CHAT_TOKENS, DEFAULT_BOS, jinja_template

        tok = self.with_special_tokens([*([] if self.bos_id is not None else [DEFAULT_BOS]), *CHAT_TOKENS])
        tok.chat_template = jinja_template(tok.roles["bos"])
        return tok

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Messages [{"role", "content"}] → (ids, supervised mask); with `add_generation_prompt` the ids end
        with the assistant marker, ready for generation (see lmforge.chat_template)."""
        from lmforge.chat_template import render

        return render(self, messages, add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Prompt ids as transformers' `apply_chat_template(..., tokenize=True)` gives them."""
        return self.render_chat(messages, add_generation_prompt)[0]

    @property
    def end_of_turn_id(self) -> int | None:
        """The id that ends a chat turn (generation stops there), or None without the chat tokens."""
        from lmforge.chat_template import END_OF_TURN

        return self.special_tokens.get(END_OF_TURN)

    # ---- HF interop -----------------------------------------------------------------------------
    def _id_bytes(self) -> list[bytes]:
        if self._id_bytes_cache is None:
            table = []
            for i in range(self.vocab_size):
                tok = self._hf.id_to_token(i) or ""
                if self._byte_level and all(c in CHAR_TO_BYTE for c in tok):
                    table.append(bytes(CHAR_TO_BYTE[c] for c in tok))
                elif BYTE_PIECE.match(tok):  # sentencepiece byte fallback: <0xE2> is one byte
                    table.append(bytes([int(tok[3:5], 16)]))
                else:  # sentencepiece-style: "\u2581" is a space
                    table.append(tok.replace("\u2581", " ").encode("utf-8"))
            self._id_bytes_cache = table
        return self._id_bytes_cache

    def to_hf_json(self) -> str:
        """This tokenizer as a Hugging Face `tokenizer.json` string."""
        if self._hf is not None:
            return self._hf.to_str()
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        def chars(b: bytes) -> str:
            return "".join(BYTE_TO_CHAR[x] for x in b)

        vocab = {chars(tok): rank for tok, rank in self._ranks.items()}
        merges = [(chars(a), chars(b)) for a, b in _merges_from_ranks(self._ranks)]
        # ignore_merges mirrors tiktoken's shortcut: a piece that is itself a token stays whole.
        hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=True))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        ordered = sorted(self.special_tokens.items(), key=lambda kv: kv[1])
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in ordered])
        for name, i in ordered:
            if hf.token_to_id(name) != i:
                raise DataError(f"special token {name!r} collides with an ordinary token; rename it")
        return hf.to_str()

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, dir: str | Path, model_max_length: int = 1_000_000_000) -> Path:
        out = Path(dir)
        atomic_write_text(out / "tokenizer.json", self.to_hf_json())
        atomic_write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False, **{f"{r}_token": n for r, n in self.roles.items()},
            **({"chat_template": self.chat_template} if self.chat_template else {})})
        info = {"format": "lmforge-tokenizer", "version": 1, "kind": self.kind,
                "vocab_size": self.vocab_size, "special_tokens": self.special_tokens, "roles": self.roles,
                "pattern": self.pattern, "fingerprint": self.fingerprint,
                "made_by": {"lmforge_version": __version__, **self.meta},
                **({"chat_template": self.chat_template} if self.chat_template else {})}
        atomic_write_json(out / INFO_FILE, info)  # written last: its presence means the dir is complete
        return out

    @classmethod
    def load(cls, dir: str | Path) -> Tokenizer:
        d = Path(dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{d}: no tokenizer.json here; train one with `lmforge tokenizer train`")
        info = _read_json(d / INFO_FILE) if (d / INFO_FILE).is_file() else {}
        if info.get("kind", "pretrained") == "pretrained":  # a bare tokenizer.json: the HF library runs it
            tok = _hf_tokenizer(path, info.get("roles"), info.get("made_by"))
            tok.chat_template = info.get("chat_template")  # only lmforge's own: render_chat implements it
            return tok
        ranks, pattern, specials = _parse_byte_level_bpe(_read_json(path), path)
        return cls(info["kind"], specials, ranks=ranks, pattern=pattern, roles=info.get("roles"),
                   meta=info.get("made_by"), chat_template=info.get("chat_template"))


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: same fallback as tiktoken
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def _safe_line_start(c: str) -> bool:
    return c.isalnum() or "!" <= c <= "~"


def _next_cut(text: str, pos: int, newlines: bool = True) -> int:
    """The first index >= pos where `text` can be cut (see chunk_text), or -1."""
    best = -1
    i = text.find("\n", pos - 1) if newlines else -1
    while i != -1 and i + 1 < len(text) and not _safe_line_start(text[i + 1]):
        i = text.find("\n", i + 1)
    if i != -1 and i + 1 < len(text):
        best = i + 1
    j = text.find(" ", max(pos, 1), best if best != -1 else len(text))
    while j != -1 and not _safe_line_start(text[j - 1]):
        j = text.find(" ", j + 1, best if best != -1 else len(text))
    return j if j != -1 else best


def _read_json(path: Path) -> dict:
    try:
        return read_json(path)
    except (OSError, orjson.JSONDecodeError) as err:
        raise DataError(f"{path}: not readable JSON ({err})") from None


def _parse_byte_level_bpe(data: dict, path: Path) -> tuple[dict[bytes, int], str, dict[str, int]]:
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise DataError(f"{path}: expected a byte-level BPE model")
    try:
        ranks = {bytes(CHAR_TO_BYTE[c] for c in tok): i for tok, i in model["vocab"].items()}
    except KeyError:
        raise DataError(f"{path}: vocab is not in the byte-level alphabet") from None
    pre = data.get("pre_tokenizer") or {}
    splits = [p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
    if not splits or "Regex" not in splits[0].get("pattern", {}):
        raise DataError(f"{path}: expected a Split pre-tokenizer with a regex")
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    return ranks, splits[0]["pattern"]["Regex"], specials


def _hf_tokenizer(path: Path, roles: dict | None = None, meta: dict | None = None) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises plain Exceptions
        raise DataError(f"{path}: not a tokenizer.json the tokenizers library can read ({err})") from None
    specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    if roles is None:
        roles = {}
        cfg_path = path.parent / "tokenizer_config.json"
        hf_cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        for role in ("bos", "eos", "pad"):
            tok = hf_cfg.get(f"{role}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if isinstance(tok, str):
                roles[role] = tok
    return Tokenizer("pretrained", specials, hf=hf, roles=roles, meta=meta)


def train_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> Tokenizer:
    """Build the tokenizer `cfg` describes; only kind "bpe" reads `texts`."""
    names = list(cfg.special_tokens)
    if len(set(names)) != len(names) or any(not n for n in names):
        raise ConfigError(f"tokenizer.special_tokens: expected distinct non-empty strings, got {names}")
    if cfg.kind == "pretrained":
        from lmforge.tokenizer_pretrained import load_pretrained

        return load_pretrained(cfg)
    if cfg.kind == "byte":
        ranks = {bytes([b]): b for b in range(256)}
        return Tokenizer("byte", {n: 256 + i for i, n in enumerate(names)}, ranks=ranks)
    n_ordinary = cfg.vocab_size - len(names)
    if n_ordinary < 256:
        raise ConfigError(f"tokenizer.vocab_size = {cfg.vocab_size} is too small: need at least "
                          f"{256 + len(names)} (256 byte tokens + {len(names)} special tokens)")
    import rustbpe

    stats = {"chars": 0, "docs": 0}
    t0 = time.perf_counter()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_limited(texts, cfg.max_train_chars, stats), n_ordinary, pattern=GPT4_PATTERN)
    if stats["chars"] == 0:
        raise DataError("no text to train the tokenizer on (the train split is empty)")
    ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
    meta = {"train_chars": stats["chars"], "train_docs": stats["docs"],
            "train_seconds": round(time.perf_counter() - t0, 3)}
    return Tokenizer("bpe", {n: len(ranks) + i for i, n in enumerate(names)}, ranks=ranks,
                     pattern=bpe.get_pattern(), meta=meta)


def _limited(texts: Iterable[str], max_chars: int, stats: dict) -> Iterator[str]:
    for text in texts:
        text = text[: max_chars - stats["chars"]] if max_chars else text
        if text:
            stats["chars"] += len(text)
            stats["docs"] += 1
            yield text
        if max_chars and stats["chars"] >= max_chars:
            return


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load from a tokenizer dir, a `tokenizer.json` file, or a run/checkpoint dir holding `tokenizer/`."""
    p = Path(path).parent if Path(path).name == "tokenizer.json" else Path(path)
    for cand in (p, p / "tokenizer"):
        if (cand / "tokenizer.json").is_file():
            return Tokenizer.load(cand)
    raise DataError(f"no tokenizer in {p} (expected tokenizer.json there or in {p / 'tokenizer'})")


def tokenizer_config_hash(cfg: TokenizerConfig) -> str:
    """Digest of the settings that change the tokenizer itself (not where it lives, not add_bos)."""
    fields = cfg.model_dump(mode="json", exclude={"dir", "add_bos"})
    return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def ensure_tokenizer(recipe: Recipe, log: Callable[[str], object] = print) -> Tokenizer:
    """Train and save the recipe's tokenizer unless an up-to-date one is already in `tokenizer.dir`."""
    cfg = recipe.tokenizer
    out = Path(cfg.dir)
    cfg_hash = tokenizer_config_hash(cfg)
    from lmforge.prepare import training_fingerprint, training_texts

    src_fp = training_fingerprint(recipe) if cfg.kind == "bpe" else ""
    if (out / INFO_FILE).is_file():
        try:
            made = read_json(out / INFO_FILE).get("made_by", {})
            if made.get("config_hash") == cfg_hash and made.get("source_fingerprint") == src_fp:
                tok = Tokenizer.load(out)
                log(f"tokenizer: up to date ({out}, {tok.kind}, vocab {tok.vocab_size}, "
                    f"{tok.fingerprint[:12]})")
                return tok
        except (DataError, orjson.JSONDecodeError, OSError):
            pass  # unreadable: rebuild it
    t0 = time.perf_counter()
    texts: Iterable[str] = training_texts(recipe) if cfg.kind == "bpe" else ()
    tok = train_tokenizer(cfg, texts)
    source = recipe.data.source if cfg.kind == "bpe" else (cfg.pretrained or cfg.kind)
    tok.meta.update({"source": source, "source_fingerprint": src_fp, "config_hash": cfg_hash,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    tok.save(out)
    what = f"trained on {tok.meta['train_chars']:,} chars" if cfg.kind == "bpe" else "built"
    log(f"tokenizer: {cfg.kind} vocab {tok.vocab_size} {what} in {time.perf_counter() - t0:.1f}s -> {out}")
    return tok
