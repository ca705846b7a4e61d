"""`lmforge chat` and the no-argument menu, driven through a pseudo-terminal as a person would."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import pexpect
import pytest
import torch

from lmforge.chat import Session, ask, list_checkpoints, memory_warning, speed_summary
from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer

STATS = r"\[\d+ tokens, [\d.]+ tokens/s, time to first token \d+ ms, [\d.]+ s"


def make_run(root: Path, name: str, tokenizer_dir: Path, arch: str = "llama", steps=(1,)) -> Path:
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(len(name))
    cfg = ModelConfig(arch=arch, vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=4, seq_len=128)
    model = Transformer(cfg)
    state = {"model_config": cfg.model_dump(mode="json"), "tokenizer_fingerprint": tok.fingerprint,
             "best_val_loss": 3.5}
    for i, step in enumerate(steps):
        save_checkpoint(root / name / "checkpoints", step, model, state, tokenizer_dir=tokenizer_dir,
                        is_best=i == 0, keep=10)
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_run(root, "alpha", tiny_tokenizer_dir, steps=(10, 20))
    make_run(root, "beta", tiny_tokenizer_dir, arch="gpt2")
    return root


def spawn(*args: str, cwd: Path | None = None) -> pexpect.spawn:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb", "COLUMNS": "120"}
    return pexpect.spawn(sys.executable, list(args), env=env, encoding="utf-8", timeout=60, cwd=cwd,
                         dimensions=(40, 120))


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_repl_streams_and_takes_commands(runs):
    child = spawn("-m", "lmforge", "chat", str(runs / "alpha"), "--device", "cpu", "--temperature", "0",
                  "--max-new-tokens", "12")
    child.expect("loaded alpha/step_000010")  # the run's best checkpoint
    child.expect("> ")
    child.sendline("ROMEO:")
    child.expect(STATS)
    child.expect("> ")
    child.sendline("/temp 0.5")
    child.expect("temperature 0.5")
    child.sendline("/max 3")
    child.expect("max tokens 3")
    child.sendline("/topk 5")
    child.expect("top_k 5")
    child.sendline("/topp 0.9")
    child.expect("top_p 0.9")
    child.sendline("To be")
    child.expect(r"\[[0-3] tokens, ")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendline("/bogus")
    child.expect("unknown command")
    child.sendline("/quit")
    assert finish(child) == 0


def test_ctrl_c_stops_an_answer(runs):
    # greedy: this random model's greedy continuation of "Once" has no <|eos|> in its first 3,000 tokens
    child = spawn("-m", "lmforge", "chat", str(runs / "alpha"), "--device", "cpu", "--max-new-tokens", "100000",
                  "--temperature", "0")
    child.expect("> ")
    child.sendline("Once")
    child.expect("Once\r\n")  # the terminal's echo of the line
    time.sleep(1.0)  # the answer (100,000 tokens) is streaming now
    child.sendintr()
    child.expect(r"stopped\]")
    child.expect("> ")
    child.sendeof()
    assert finish(child) == 0


def test_several_checkpoints_and_speed_summary(runs):
    child = spawn("-m", "lmforge", "chat", str(runs / "alpha"), str(runs / "beta"), "--device", "cpu",
                  "--max-new-tokens", "8", "--temperature", "0")
    child.expect("> ")
    child.sendline("Good morrow")
    child.expect("--- alpha/step_000010")
    child.expect(STATS)
    child.expect("--- beta/step_000001")
    child.expect(STATS)
    child.expect(r"fastest: \S+ \([\d.]+ s\); most tokens/s: \S+")
    child.sendline("/quit")
    assert finish(child) == 0


@pytest.mark.slow
def test_side_by_side(runs):
    child = spawn("-m", "lmforge", "chat", str(runs / "alpha"), str(runs / "beta"), "--device", "cpu",
                  "--max-new-tokens", "8", "--side-by-side")
    child.expect("> ")
    child.sendline("Hark")
    child.expect("alpha/step_000010.*?beta/step_000001")
    child.expect("fastest: ")
    child.sendline("/quit")
    assert finish(child) == 0


def test_listing_and_picking(runs):
    child = spawn("-m", "lmforge", "chat", "--runs", str(runs), "--device", "cpu", "--max-new-tokens", "4")
    child.expect(r"1  alpha/step_000010  \(best\)  val loss 3.500")
    child.expect(r"2  alpha/step_000020  \(latest\)")
    child.expect(r"3  beta/step_000001  \(best, latest\)|3  beta/step_000001  \(latest, best\)")
    child.expect("pick checkpoints")
    child.sendline("9")
    child.expect("numbers between 1 and 3")
    child.sendline("2")
    child.expect("loaded alpha/step_000020")
    child.expect("> ")
    child.sendline("/quit")
    assert finish(child) == 0
    assert [label.split()[0] for _, label in list_checkpoints(runs)] == [
        "alpha/step_000010", "alpha/step_000020", "beta/step_000001"]


def test_menu_runs_a_command_and_quits_on_ctrl_c(runs):
    child = spawn("-c", "import sys; from lmforge.menu import run_menu; sys.exit(run_menu())")
    child.expect(r"(\d+)\s+generate\s")
    number = child.match.group(1)
    child.expect("choice: ")
    child.sendline("x")
    child.expect("choose 1-")
    child.expect("choice: ")
    child.sendline(number)
    child.expect(r"checkpoint or run dir \[runs/demo\]: ")
    child.sendline(str(runs / "beta"))
    child.expect(r"prompt \[ROMEO:\]: ")
    child.sendline("")
    child.expect("extra options")
    child.sendline("--max-new-tokens 5 --temperature 0 --device cpu")
    child.expect("running: lmforge generate")
    child.expect("ROMEO:")
    child.expect("finished with exit code 0")
    child.expect(r"run another command\? \(y/n\) \[y\]: ")
    child.sendline("y")
    child.expect("choice: ")
    child.sendintr()
    child.expect("bye")
    assert finish(child) == 130


def test_conversation_is_kept_with_a_chat_template(tiny_tokenizer_dir):
    """An SFT tokenizer (with the chat tokens and template) gets the whole conversation every turn."""
    tok = Tokenizer.load(tiny_tokenizer_dir).with_chat_tokens()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="llama", vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2,
                                    seq_len=128)).eval()
    seen, render = [], tok.apply_chat_template

    def spy(messages, add_generation_prompt=False):
        seen.append([m["content"] for m in messages])
        return render(messages, add_generation_prompt)

    tok.apply_chat_template = spy
    s = Session("sft", model, tok)
    assert s.templated
    p = SamplingParams(max_new_tokens=4, temperature=0)
    first = ask(s, "hello", p)
    ask(s, "again", p)
    assert seen == [["hello"], ["hello", first.text, "again"]]
    assert [m["role"] for m in s.history] == ["user", "assistant", "user", "assistant"]


def test_memory_warning(runs, monkeypatch):
    import lmforge.chat as chat

    paths = [str(runs / "alpha"), str(runs / "beta")]
    assert memory_warning(paths, torch.device("cpu")) is None
    monkeypatch.setattr(chat, "available_memory", lambda device: 1000)
    assert "need about" in memory_warning(paths, torch.device("cpu"))
    out = io.StringIO()
    from lmforge.chat import Answer

    out.write(speed_summary([Answer("a", "x", 10, 0.1, 1.0), Answer("b", "y", 30, 0.1, 2.0)]))
    assert out.getvalue() == "fastest: a (1.00 s); most tokens/s: b (15.0 tokens/s)"


def test_a_diffusion_answer_is_redrawn_on_a_terminal_and_printed_once_elsewhere():
    from lmforge.config import TokenizerConfig
    from lmforge.diffusion import MASK_GLYPH, MASK_TOKEN, diffusion_progress
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(TokenizerConfig(kind="byte", special_tokens=["<|bos|>", "<|eos|>", MASK_TOKEN]), [])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="llama", vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2,
                                    seq_len=64, objective="diffusion")).eval()
    s, p = Session("diffusion", model, tok), SamplingParams(max_new_tokens=12, temperature=0)
    *_, (_, settled) = diffusion_progress(model, tok, "ab", max_new_tokens=12, steps=6, temperature=0)
    plain = io.StringIO()
    answer = ask(s, "ab", p, out=plain, steps=6)
    assert plain.getvalue() == answer.text == settled.text and answer.tokens == len(settled.tokens)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    assert ask(s, "ab", p, out=tty, steps=6).text == answer.text
    frames = tty.getvalue().split("\x1b[J")[1:]  # each drawing starts by clearing the last one
    assert len(frames) > 1 and MASK_GLYPH in frames[0] and frames[-1] == answer.text


def test_canvas_rows_count_screen_columns(monkeypatch):
    import shutil

    from lmforge.chat import CanvasView, columns

    assert columns("abc") == 3 and columns("日本") == 4 and columns("e\u0301") == 1  # wide; combining accent
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((10, 24)))
    out = io.StringIO()
    view = CanvasView(out)
    view.show("日本語の文章です")  # 8 wide characters: 16 columns, two rows on a 10-column screen
    assert view.rows == 1
    view.show("short")
    assert "\x1b[1A" in out.getvalue().rsplit("\r", 1)[-1]  # back up over both rows before redrawing
    assert view.rows == 0
