"""The chat template: exact supervised positions, conversation checks, record formats, chat tokens."""

from __future__ import annotations

import orjson
import pytest

from lmforge.chat_template import (
    CHAT_TOKENS,
    END_OF_TURN,
    ROLE_TOKENS,
    ChatFormatError,
    problem,
    render,
    show,
    to_messages,
)
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def base_tok(tiny_tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def chat_tok(base_tok) -> Tokenizer:
    return base_tok.with_chat_tokens()


def supervised_positions(mask: list[bool]) -> set[int]:
    return {i for i, s in enumerate(mask) if s}


def test_single_turn_supervises_exactly_the_answer_and_its_end(chat_tok):
    sp = chat_tok.special_tokens
    user, reply = chat_tok.encode("What is a rose?"), chat_tok.encode("A flower, by any other name.")
    ids, mask = chat_tok.render_chat([{"role": "user", "content": "What is a rose?"},
                                      {"role": "assistant", "content": "A flower, by any other name."}])
    assert ids == [chat_tok.bos_id, sp["<|user|>"], *user, sp[END_OF_TURN], sp["<|assistant|>"], *reply,
                   sp[END_OF_TURN]]
    first = 3 + len(user) + 1  # bos, <|user|>, user text, <|end|>, <|assistant|>
    assert supervised_positions(mask) == set(range(first, first + len(reply) + 1))


def test_multi_turn_with_system_supervises_every_answer_and_nothing_else(chat_tok):
    msgs = [{"role": "system", "content": "Speak as a player."},
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "A poor player."},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "Heard no more."}]
    ids, mask = chat_tok.render_chat(msgs)
    expected, at = set(), 1  # after <|bos|>
    for m in msgs:
        n = len(chat_tok.encode(m["content"]))
        if m["role"] == "assistant":
            expected |= set(range(at + 1, at + 1 + n + 1))  # the content and its <|end|>, not the marker
        at += n + 2
    assert at == len(ids) and supervised_positions(mask) == expected
    assert show(chat_tok, ids, mask).count("[[") == 2
    assert "[[A poor player.<|end|>]]" in show(chat_tok, ids, mask)


def test_generation_prompt_ends_with_the_assistant_marker(chat_tok):
    msgs = [{"role": "user", "content": "Hello"}]
    ids, mask = chat_tok.render_chat(msgs, add_generation_prompt=True)
    assert ids[-1] == chat_tok.special_tokens["<|assistant|>"] and not any(mask)
    assert chat_tok.apply_chat_template(msgs, add_generation_prompt=True) == ids
    assert chat_tok.end_of_turn_id == chat_tok.special_tokens[END_OF_TURN]


@pytest.mark.parametrize("msgs, why", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "two user turns in a row"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": "c"}], "empty content"),
    ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "c"}], "unknown role"),
    ([{"role": "assistant", "content": "c"}], "does not start with a user turn"),
    ([{"role": "user", "content": "a"}], "no assistant answer at the end"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "c"}],
     "system message not first"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "c"}], "malformed message"),
    ([], "no messages"),
])
def test_odd_conversations_are_named(chat_tok, msgs, why):
    assert problem(msgs) == why
    with pytest.raises(ChatFormatError, match=why):
        render(chat_tok, msgs)


def test_record_formats_become_the_same_messages():
    want = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert to_messages({"conversations": ["Q", "A"]}) == want
    assert to_messages({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}) == want
    assert to_messages({"messages": want}) == want
    assert to_messages({"instruction": "Q", "input": "", "output": "A"}) == want
    alpaca = to_messages({"instruction": "Q", "input": "ctx", "output": "A", "history": [["h1", "a1"]],
                          "system": "S"})
    assert [m["role"] for m in alpaca] == ["system", "user", "assistant", "user", "assistant"]
    assert alpaca[3]["content"] == "Q\n\nctx"
    assert to_messages({"conversations": ["Q", "A"]}, system_prompt="Be kind.")[0] == {"role": "system",
                                                                                       "content": "Be kind."}
    assert to_messages({"text": "plain"}) == "unknown format"
    assert to_messages({"messages": ["Q"]}) == "malformed record"
    assert to_messages(None) == "malformed record"
    assert to_messages({"conversations": ["Q", "A", "Q2"]}) == "no assistant answer at the end"


def test_chat_tokens_extend_without_changing_old_ids(base_tok, chat_tok):
    text = "O Romeo, Romeo! wherefore art thou Romeo?"
    assert chat_tok.encode(text) == base_tok.encode(text)
    assert all(chat_tok.special_tokens[n] == i for n, i in base_tok.special_tokens.items())
    new = [chat_tok.special_tokens[n] for n in CHAT_TOKENS]
    assert new == list(range(base_tok.vocab_size, base_tok.vocab_size + len(CHAT_TOKENS)))
    assert chat_tok.vocab_size == base_tok.vocab_size + len(CHAT_TOKENS)
    assert chat_tok.fingerprint != base_tok.fingerprint and base_tok.chat_template is None
    again = chat_tok.with_chat_tokens()
    assert again.vocab_size == chat_tok.vocab_size and again.fingerprint == chat_tok.fingerprint


def test_chat_template_is_saved_and_loaded(chat_tok, tmp_path):
    chat_tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.chat_template == chat_tok.chat_template and loaded.fingerprint == chat_tok.fingerprint
    cfg = orjson.loads((tmp_path / "tokenizer_config.json").read_bytes())
    assert cfg["chat_template"] == chat_tok.chat_template
    assert all(f"'{t}'" in chat_tok.chat_template or t in ROLE_TOKENS.values() for t in CHAT_TOKENS)


def test_byte_and_hf_backed_tokenizers_get_chat_tokens(base_tok, tmp_path):
    from lmforge.config import TokenizerConfig
    from lmforge.tokenizer import train_tokenizer

    byte = train_tokenizer(TokenizerConfig(kind="byte", special_tokens=["<|eos|>"]), []).with_chat_tokens()
    assert byte.bos_id == byte.special_tokens["<|bos|>"]  # it had none: the template brings its own
    ids, _ = byte.render_chat([{"role": "user", "content": "hé"}, {"role": "assistant", "content": "ok"}])
    assert ids[:2] == [byte.bos_id, byte.special_tokens["<|user|>"]] and ids[2:5] == list("hé".encode())
    (tmp_path / "tokenizer.json").write_text(base_tok.to_hf_json(), encoding="utf-8")
    hf = Tokenizer.load(tmp_path)  # no lmforge_tokenizer.json: the HF library runs it
    assert hf.kind == "pretrained"
    chat = hf.with_chat_tokens()
    assert chat.encode("To be, or not") == hf.encode("To be, or not")
    assert chat.special_tokens[END_OF_TURN] == hf.vocab_size + 3
    ids, mask = chat.render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert chat.decode(ids) == "<|bos|><|user|>a<|end|><|assistant|>b<|end|>" and sum(mask) == 2
