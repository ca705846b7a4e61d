"""The chat template ⇄ transformers: `apply_chat_template` on the saved (and the exported) tokenizer gives
the same ids as `Tokenizer.render_chat`, for lmforge's own BPE and for a Hugging Face tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig
from lmforge.export import export_checkpoint
from lmforge.models.transformer import Transformer
from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What light through yonder window breaks?"},
               {"role": "assistant", "content": "It is the east, and Juliet is the sun."}],
    "multi-system": [{"role": "system", "content": "You are terse.\nAnswer in one line."},
                     {"role": "user", "content": " leading space, trailing space "},
                     {"role": "assistant", "content": "ok"},
                     {"role": "user", "content": "Grüße 日本語 🎉 tabs\tand\n\nnewlines"},
                     {"role": "assistant", "content": "def f(x):\n    return x ** 2  # code"}],
}


def hf_ids(folder: Path, messages: list[dict], generation: bool) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation, return_dict=False)
    return list(out)


def hf_backed(base: Tokenizer, folder: Path) -> Tokenizer:
    folder.mkdir()
    (folder / "tokenizer.json").write_text(base.to_hf_json(), encoding="utf-8")
    return Tokenizer.load(folder)


@pytest.mark.parametrize("backend", ["lmforge-bpe", "hf-tokenizers"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_apply_chat_template_renders_the_same_ids(tiny_tokenizer_dir, tmp_path, backend, name):
    base = Tokenizer.load(tiny_tokenizer_dir)
    if backend == "hf-tokenizers":
        base = hf_backed(base, tmp_path / "hf")
    chat = base.with_chat_tokens()
    chat.save(tmp_path / "chat")
    msgs = CONVERSATIONS[name]
    assert hf_ids(tmp_path / "chat", msgs, False) == chat.render_chat(msgs)[0]
    prompt = msgs[:-1]
    assert hf_ids(tmp_path / "chat", prompt, True) == chat.render_chat(prompt, add_generation_prompt=True)[0]


def test_unknown_role_is_refused_by_both(tiny_tokenizer_dir, tmp_path):
    chat = Tokenizer.load(tiny_tokenizer_dir).with_chat_tokens()
    chat.save(tmp_path)
    bad = [{"role": "narrator", "content": "Enter Ghost."}]
    with pytest.raises(Exception, match="unknown role"):
        hf_ids(tmp_path, bad, False)
    with pytest.raises(Exception, match="unknown role"):
        chat.render_chat(bad)


def test_exported_sft_checkpoint_carries_the_template(tiny_tokenizer_dir, tmp_path):
    chat = Tokenizer.load(tiny_tokenizer_dir).with_chat_tokens()
    chat.save(tmp_path / "tok")
    cfg = ModelConfig(preset="tiny", vocab_size=chat.vocab_size)
    torch.manual_seed(0)
    state = {"model_config": cfg.model_dump(mode="json"), "tokenizer_fingerprint": chat.fingerprint}
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, Transformer(cfg), state, tokenizer_dir=tmp_path / "tok")
    out = export_checkpoint(ckpt, tmp_path / "hf", "hf", log=lambda _: None)
    msgs = CONVERSATIONS["multi-system"]
    assert transformers.AutoTokenizer.from_pretrained(str(out)).chat_template == chat.chat_template
    assert hf_ids(out, msgs[:-1], True) == chat.render_chat(msgs[:-1], add_generation_prompt=True)[0]
    assert Tokenizer.load(out).chat_template == chat.chat_template  # lmforge reloads it from the export
