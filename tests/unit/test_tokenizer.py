from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config import Recipe, TokenizerConfig
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import Tokenizer, ensure_tokenizer, load_tokenizer, train_tokenizer

RICH = (
    "Héllo wörld! Ça va? naïve café — «quotes» ‘single’\n"
    "中文字符测试，日本語のテキスト。한국어 텍스트\n"
    "Emoji: 🎉🚀👩‍👩‍👧 ❤️ flags 🇫🇷\n"
    "مرحبا بالعالم   עברית\n\n\n"
    "    indented\tтабуляция\r\nwindows line\n"
    "digits 1234567 3.14159 -42 1e10 ٣٤٥ ００１\n"
    "I'm we'll they've DON'T it's   \n  trailing   spaces    \n"
    "math ∑∫√ ≠ ≤ and combining e\u0301 a\u0308\u00a0nbsp\u2003em-space\u200bzw"
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return train_tokenizer(TokenizerConfig(kind="byte"), [])


def test_trained_bpe_basics(tok: Tokenizer, shakespeare: str) -> None:
    assert tok.kind == "bpe"
    assert tok.vocab_size == 512
    assert tok.special_tokens == {"<|bos|>": 509, "<|eos|>": 510, "<|pad|>": 511}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (509, 510, 511)
    assert len(tok.fingerprint) == 64 and int(tok.fingerprint, 16) >= 0
    text = shakespeare[200_000:210_000]  # outside the training slice
    ids = tok.encode(text)
    assert len(ids) < 0.6 * len(text.encode())  # merges were learned and used
    assert max(ids) < 509
    assert tok.encode_batch([text, "", "ROMEO:"]) == [ids, [], tok.encode("ROMEO:")]


@FAST
@given(text=st.text(max_size=200))
def test_bpe_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


@FAST
@given(text=st.text(max_size=200))
def test_byte_round_trip(byte_tok: Tokenizer, text: str) -> None:
    ids = byte_tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert byte_tok.decode(ids) == text


def test_token_bytes(tok: Tokenizer) -> None:
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and tb.dtype.kind == "i"
    assert (tb[list(tok.special_tokens.values())] == 0).all()
    assert (tb[:256] == 1).all() and (tb[256:509] >= 2).all()
    ids = tok.encode(RICH)
    assert int(tb[ids].sum()) == len(RICH.encode("utf-8"))


def test_decode_invalid_utf8_gives_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("é")  # bytes C3 A9; id 0xC3 is the lone first byte, not valid UTF-8
    assert tok.decode([0xC3]) == "\ufffd" and tok.decode_bytes([0xC3]) == b"\xc3"
    assert tok.decode(ids) == "é"


def test_specials_in_text_stay_text(tok: Tokenizer) -> None:
    text = "<|bos|>hello<|eos|> <|pad|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + tok.encode("hi") + [tok.eos_id]) == "<|bos|>hi<|eos|>"


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_hf_parity(kind: str, tok: Tokenizer, byte_tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    t = tok if kind == "bpe" else byte_tok
    t.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in (RICH, RICH * 3, " leading", "x" * 300, "\n\n\n", "   ", "a  \n\n b"):
        assert hf.encode(text, add_special_tokens=False) == t.encode(text), text
        assert hf.decode(t.encode(text)) == text
    assert hf.convert_tokens_to_ids(["<|bos|>", "<|eos|>", "<|pad|>"]) == [t.bos_id, t.eos_id, t.pad_id]
    assert len(hf) == t.vocab_size
    # transformers also reads tokenizer_config.json from a directory
    hf_dir = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert (hf_dir.bos_token, hf_dir.eos_token, hf_dir.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert hf_dir.encode(RICH, add_special_tokens=False) == t.encode(RICH)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("ab 1!'\n\t\r") + ["é", "中", "🎉", "\u00a0"]), max_size=80)
       | st.text(max_size=80))
def test_hf_parity_random(tok: Tokenizer, hf_tok, text: str) -> None:
    if "<|" not in text:
        assert hf_tok.encode(text, add_special_tokens=False).ids == tok.encode(text)


@pytest.fixture(scope="module")
def hf_tok(tiny_tokenizer_dir: Path):
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))


@pytest.mark.parametrize("extra", [[b"bc", b"ab", b"abc", b"xyz"], [b"ab", b"bc", b"abc", b"xyz"]])
def test_hf_parity_merge_paths(extra: list[bytes], tmp_path: Path) -> None:
    """Tokens reachable only through a split other than the first, or not through merges at all."""
    from tokenizers import Tokenizer as HFTokenizer

    ranks = {bytes([b]): b for b in range(256)} | {t: 256 + i for i, t in enumerate(extra)}
    t = Tokenizer("bpe", {"<|eos|>": 260}, ranks=ranks)
    t.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert t.encode("abcd") == [258, ord("d")] and t.encode("xyz") == [259]
    for text in ("abcd", "abc", "xyz", "xyzw", "zabcab", "dabc abcabc"):
        assert hf.encode(text, add_special_tokens=False).ids == t.encode(text), text


def test_save_load_same(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "t")
    info = orjson.loads((tmp_path / "t" / "lmforge_tokenizer.json").read_bytes())
    assert info["kind"] == "bpe" and info["vocab_size"] == 512 and info["fingerprint"] == tok.fingerprint
    assert info["special_tokens"] == tok.special_tokens and info["pattern"] == tok.pattern
    assert {"source", "config_hash", "lmforge_version"} <= set(info["made_by"])
    hf_cfg = orjson.loads((tmp_path / "t" / "tokenizer_config.json").read_bytes())
    assert hf_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and hf_cfg["eos_token"] == "<|eos|>"
    again = Tokenizer.load(tmp_path / "t")
    assert again.fingerprint == tok.fingerprint
    assert again.encode(RICH) == tok.encode(RICH)
    assert np.array_equal(again.token_bytes(), tok.token_bytes())
    assert pickle.loads(pickle.dumps(tok)).encode(RICH) == tok.encode(RICH)


def test_byte_kind_save_load(byte_tok: Tokenizer, tmp_path: Path) -> None:
    assert byte_tok.vocab_size == 259 and byte_tok.eos_id == 257
    byte_tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.kind == "byte" and again.fingerprint == byte_tok.fingerprint
    assert again.encode(RICH) == list(RICH.encode())


def test_fingerprint_tracks_content(tok: Tokenizer, shakespeare: str) -> None:
    other = train_tokenizer(TokenizerConfig(vocab_size=400), [shakespeare[:50_000]])
    assert other.fingerprint != tok.fingerprint
    renamed = train_tokenizer(TokenizerConfig(vocab_size=400, special_tokens=["<|eos|>", "<|bos|>"]),
                              [shakespeare[:50_000]])
    assert renamed.fingerprint != other.fingerprint
    assert train_tokenizer(TokenizerConfig(vocab_size=400), [shakespeare[:50_000]]).fingerprint == \
        other.fingerprint


def test_vocab_too_small() -> None:
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        train_tokenizer(TokenizerConfig(vocab_size=258), ["some text"])
    with pytest.raises(ConfigError, match="tokenizer.special_tokens"):
        train_tokenizer(TokenizerConfig(special_tokens=["<|a|>", "<|a|>"]), ["x"])
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(TokenizerConfig(vocab_size=300), [])


def test_max_train_chars(shakespeare: str) -> None:
    t = train_tokenizer(TokenizerConfig(vocab_size=300, max_train_chars=1000), [shakespeare[:600]] * 5)
    assert t.meta["train_chars"] == 1000 and t.meta["train_docs"] == 2


def test_chunk_text_keeps_ids(tok: Tokenizer, shakespeare: str) -> None:
    text = shakespeare[:60_000]
    chunks = tok.chunk_text(text, 5_000)
    assert len(chunks) > 5 and "".join(chunks) == text
    assert [i for c in chunks for i in tok.encode(c)] == tok.encode(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("ab1!.' \n\n\n\r\t") + ["\u00a0", "\u2028", "é"]),
                    max_size=120), size=st.integers(1, 20))
def test_chunk_text_random(tok: Tokenizer, text: str, size: int) -> None:
    chunks = tok.chunk_text(text, size)
    assert "".join(chunks) == text
    assert [i for c in chunks for i in tok.encode(c)] == tok.encode(text)


def test_pretrained_kind(tiny_tokenizer_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    only_json = tmp_path / "hf"
    only_json.mkdir()
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", only_json / "tokenizer.json")
    pre = train_tokenizer(TokenizerConfig(kind="pretrained", pretrained=str(only_json)), [])
    assert pre.kind == "pretrained" and pre.vocab_size == 512
    assert (pre.bos_id, pre.eos_id, pre.pad_id) == (509, 510, 511)
    assert pre.encode(RICH) == tok.encode(RICH)
    assert pre.encode("<|eos|>") == tok.encode("<|eos|>")  # special text stays text here too
    assert pre.decode(pre.encode(RICH)) == RICH
    assert np.array_equal(pre.token_bytes(), tok.token_bytes())
    pre.save(tmp_path / "saved")
    assert Tokenizer.load(tmp_path / "saved").fingerprint == pre.fingerprint
    with pytest.raises(DataError, match="not found"):
        train_tokenizer(TokenizerConfig(kind="pretrained", pretrained=str(tmp_path / "nope")), [])


def test_load_tokenizer_paths(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_tokenizer_dir, run / "tokenizer")
    assert load_tokenizer(run).kind == "bpe"
    assert load_tokenizer(run / "tokenizer" / "tokenizer.json").vocab_size == 512
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_ensure_tokenizer_up_to_date(tiny_recipe: Recipe, tmp_path: Path) -> None:
    logs: list[str] = []
    t = ensure_tokenizer(tiny_recipe, log=logs.append)
    assert "up to date" in logs[-1] and t.vocab_size == 512
    tiny_recipe.tokenizer.dir = str(tmp_path / "tok")
    tiny_recipe.tokenizer.vocab_size = 300
    t2 = ensure_tokenizer(tiny_recipe, log=logs.append)
    assert "trained" in logs[-1] and t2.vocab_size == 300
    assert t2.meta["train_chars"] == int(len((Path(tiny_recipe.data.source)).read_text()) * 0.9)
    ensure_tokenizer(tiny_recipe, log=logs.append)
    assert "up to date" in logs[-1]
    tiny_recipe.data.val_fraction = 0.2  # another train split → retrain
    ensure_tokenizer(tiny_recipe, log=logs.append)
    assert "trained" in logs[-1]
    assert not list(Path(tiny_recipe.tokenizer.dir).glob(".*tmp"))


def test_bench_tokenizer_shape(capsys: pytest.CaptureFixture) -> None:
    from lmforge.bench_tokenizer import bench_tokenizer, print_bench_table

    result = bench_tokenizer(vocab_size=300, mbytes=0.05, repeats=1)
    assert {"platform", "cpu_count", "tiktoken"} <= set(result["machine"])
    names = [r["name"] for r in result["results"]]
    assert names[:3] == ["train lmforge", "train rustbpe", "train hf-tokenizers"]
    assert {"encode_batch lmforge", "encode_batch tiktoken", "encode lmforge", "encode hf-tokenizers"} \
        <= set(names)
    assert all(r["tokens_per_s"] > 0 and r["seconds"] > 0 for r in result["results"])
    tokens = {r["tokens"] for r in result["results"] if "tokens" in r}
    assert tokens == {result["settings"]["tokens"]}  # every encoder produced the same number of tokens
    orjson.dumps(result)
    print_bench_table(result)
    assert "encode_batch lmforge" in capsys.readouterr().out


# ---- pretrained formats ----------------------------------------------------------------------------
SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "samples"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory, shakespeare: str) -> Path:
    """A small SentencePiece BPE trained the way Llama's was: <unk>=0 <s>=1 </s>=2, byte fallback."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    (d / "train.txt").write_text(shakespeare[:200_000], encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "train.txt"), model_prefix=str(d / "llama"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True)
    return d / "llama.model"


def test_sentencepiece_model(spm_model: Path, tmp_path: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    t = train_tokenizer(TokenizerConfig(kind="pretrained", pretrained=str(spm_model)), [])
    assert t.kind == "pretrained" and t.vocab_size == 400
    assert (t.bos_id, t.eos_id) == (1, 2) and t.roles["bos"] == "<s>" and t.roles["eos"] == "</s>"
    assert t.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    for text in ("ROMEO: what light through yonder window breaks?", "Héllo wörld 中文 🎉 12345\n\nline",
                 "two  spaces\tand a tab"):
        assert t.encode(text) == sp.encode(text), text
        assert t.decode(t.encode(text)) == text
        assert int(t.token_bytes()[t.encode(text)].sum()) == len(text.encode("utf-8")) + 1  # + the "▁" prefix
    t.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.fingerprint == t.fingerprint and again.encode("to be or not") == sp.encode("to be or not")
    (tmp_path / "llama_dir").mkdir()
    shutil.copy(spm_model, tmp_path / "llama_dir" / "tokenizer.model")
    from_dir = train_tokenizer(TokenizerConfig(kind="pretrained", pretrained=str(tmp_path / "llama_dir")), [])
    assert from_dir.fingerprint == t.fingerprint
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        train_tokenizer(TokenizerConfig(kind="pretrained", pretrained=str(tmp_path / "junk.model")), [])


def test_transformers_path(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub names go through transformers' AutoTokenizer; a saved local directory takes the same path."""
    import huggingface_hub.constants
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests

    from lmforge.tokenizer_pretrained import _transformers

    tok.save(tmp_path / "lm")
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "lm"))
    hf.save_pretrained(str(tmp_path / "hub_like"))
    t = _transformers(str(tmp_path / "hub_like"))
    assert t.encode(RICH) == tok.encode(RICH) and (t.bos_id, t.eos_id) == (tok.bos_id, tok.eos_id)
    assert t.meta["pretrained"] == str(tmp_path / "hub_like")
    with pytest.raises(DataError, match="cannot load 'no-such-org/no-such-tokenizer-xyz'"):
        _transformers("no-such-org/no-such-tokenizer-xyz")


def test_chunk_text_long_single_line(tok: Tokenizer) -> None:
    line = ("lorem ipsum, dolor (sit) amet " * 4000).strip()  # no newline anywhere
    chunks = tok.chunk_text(line, 5000)
    assert len(chunks) > 10 and "".join(chunks) == line
    assert [i for c in chunks for i in tok.encode(c)] == tok.encode(line)
