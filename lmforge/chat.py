"""`lmforge chat`: an interactive REPL over one or several checkpoints.

Base models continue each prompt as plain text; models whose tokenizer has a chat template keep the
conversation and render it with the template. With several checkpoints every prompt goes to each of
them (one after another while streaming, or in columns with --side-by-side) and a speed summary
follows. A masked-diffusion model's answer is its canvas, redrawn in place after each denoising step
on a terminal (masked tokens show as a glyph) and printed once finished otherwise.
"""

from __future__ import annotations

import shutil
import sys
import time
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.sampling import SamplingParams

HELP = """commands:
  /temp T    temperature (0 = greedy)     /topk K    keep the K most likely tokens (0 = all)
  /topp P    nucleus sampling (1 = off)   /minp P    drop tokens below P x the top one
  /max N     new tokens per answer        /seed S    fix the seed (/seed off for random)
  /steps K   denoising steps of a diffusion model (more = better, slower)
  /reset     forget the conversation      /settings  show the settings
  /help      this list                    /quit      leave (also Ctrl-D)
Ctrl-C stops an answer while it streams."""

SETTERS = {"/temp": ("temperature", float), "/temperature": ("temperature", float), "/topk": ("top_k", int),
           "/topp": ("top_p", float), "/minp": ("min_p", float), "/max": ("max_new_tokens", int),
           "/seed": ("seed", int)}


@dataclass
class ChatSettings:
    params: SamplingParams
    side_by_side: bool = False
    steps: int = 32
    """Denoising steps per answer of a diffusion model."""


@dataclass
class Session:
    """One checkpoint in the chat, with its conversation."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    history: list[dict] = field(default_factory=list)

    @property
    def templated(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def diffusion(self) -> bool:
        return getattr(self.model.cfg, "objective", "autoregressive") == "diffusion"


@dataclass
class Answer:
    name: str
    text: str
    tokens: int
    ttft_s: float
    total_s: float
    stopped: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0

    def stats(self) -> str:
        return (f"[{self.tokens} tokens, {self.tokens_per_s:.1f} tokens/s, time to first token "
                f"{self.ttft_s * 1000:.0f} ms, {self.total_s:.2f} s{', stopped' if self.stopped else ''}]")


# ---- the REPL -------------------------------------------------------------------------------------
def run_chat(paths: list[str], settings: ChatSettings, *, device: str = "auto", dtype: str = "auto",
             quantize: str | None = None, out=None) -> None:
    """Load the checkpoints and read prompts until /quit or end of input."""
    from lmforge.generate import load_for_inference
    from lmforge.runtime import resolve_device

    out = out or sys.stdout
    dev = resolve_device(device)
    warning = memory_warning(paths, dev)
    if warning:
        out.write(f"warning: {warning}\n")
    sessions = []
    for p in paths:
        model, tok, state = load_for_inference(p, dev, dtype=dtype, quantize=quantize)
        sessions.append(Session(_short_name(state["path"]), model, tok))
        kind = "chat template" if sessions[-1].templated else "plain text"
        if sessions[-1].diffusion:
            kind += f", masked diffusion in {settings.steps} steps (/steps K)"
        out.write(f"loaded {sessions[-1].name}: {model.cfg.arch}, context {model.cfg.seq_len}, {kind}\n")
    out.write("type a prompt, /help for commands, /quit to leave\n")
    out.flush()
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(line.strip(), settings, sessions, out):
                return
            continue
        _ask_all(line, sessions, settings, out)


def _command(line: str, settings: ChatSettings, sessions: list[Session], out) -> bool:
    """Apply one /command; False means quit."""
    cmd, _, arg = line.partition(" ")
    if cmd in ("/quit", "/exit", "/q"):
        return False
    if cmd == "/help":
        out.write(HELP + "\n")
    elif cmd == "/reset":
        for s in sessions:
            s.history.clear()
        out.write("conversation cleared\n")
    elif cmd == "/settings":
        out.write(_describe(settings, sessions) + "\n")
    elif cmd == "/steps":
        try:
            if int(arg) < 1:
                raise ValueError("steps must be at least 1")
            settings.steps = int(arg)
            out.write(_describe(settings, sessions) + "\n")
        except ValueError as err:
            out.write(f"{cmd}: {err}\n")
    elif cmd in SETTERS:
        name, kind = SETTERS[cmd]
        try:
            value = None if name == "seed" and arg.strip() in ("off", "none") else kind(arg)
            settings.params = replace(settings.params, **{name: value})
            out.write(_describe(settings, sessions) + "\n")
        except ValueError as err:
            out.write(f"{cmd}: {err or 'expected a number'}\n")
    else:
        out.write(f"unknown command {cmd}; /help lists them\n")
    out.flush()
    return True


def _describe(settings: ChatSettings, sessions: list[Session]) -> str:
    p = settings.params
    steps = f", steps {settings.steps}" if any(s.diffusion for s in sessions) else ""
    return (f"temperature {p.temperature}, top_k {p.top_k}, top_p {p.top_p}, min_p {p.min_p}, "
            f"max tokens {p.max_new_tokens}, seed {p.seed}{steps}")


def _ask_all(prompt: str, sessions: list[Session], settings: ChatSettings, out) -> None:
    answers = []
    for s in sessions:
        if len(sessions) > 1 and not settings.side_by_side:
            out.write(f"--- {s.name}\n")
        answers.append(ask(s, prompt, settings.params, out=None if settings.side_by_side else out,
                           steps=settings.steps))
        if not settings.side_by_side:
            out.write(f"\n{answers[-1].stats()}\n")
        out.flush()
        if answers[-1].stopped:
            break
    if settings.side_by_side:
        _print_columns(answers, out)
    if len(answers) > 1:
        out.write(speed_summary(answers) + "\n")
    out.flush()


def ask(s: Session, prompt: str, params: SamplingParams, out=None, *, steps: int = 32) -> Answer:
    """One answer from one session, streamed to `out` when given. Ctrl-C stops it early. A diffusion
    model answers in `steps` denoising steps."""
    from lmforge.engine import Engine

    if s.diffusion:
        return _ask_diffusion(s, prompt, params, steps, out)
    ids, stop, stop_ids, turn = _prompt(s, prompt, params)
    # a plain-text continuation may run past the context: slide the window instead of stopping
    engine = Engine(s.model, s.tokenizer, max_batch=1, slide=not s.templated)
    row = engine.submit(ids, replace(params, stop=tuple(params.stop) + stop), stop_ids=stop_ids)
    stopped = False
    try:
        while not row.finished:
            for ev in engine.step():
                if out is not None and ev.delta:
                    out.write(ev.delta)
                    out.flush()
    except KeyboardInterrupt:
        stopped = True
        engine.cancel(row)
    end = row.t_end or time.perf_counter()
    if turn is not None:
        s.history += [turn, {"role": "assistant", "content": row.text}]
    return Answer(s.name, row.text, len(row.tokens), (row.t_first or end) - row.t_submit, end - row.t_submit,
                  stopped)


def _ask_diffusion(s: Session, prompt: str, params: SamplingParams, steps: int, out) -> Answer:
    from lmforge.diffusion import diffusion_progress

    ids, stop, stop_ids, turn = _prompt(s, prompt, params)
    view = CanvasView(out) if out is not None and getattr(out, "isatty", lambda: False)() else None
    t_start = time.perf_counter()
    t_first, settled, stopped = None, None, False
    try:
        for shown, settled in diffusion_progress(
                s.model, s.tokenizer, ids, max_new_tokens=params.max_new_tokens, steps=steps,
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed,
                stop=tuple(params.stop) + stop, stop_ids=stop_ids):
            t_first = t_first or time.perf_counter()
            if view is not None:
                view.show(shown)
            if settled.finish_reason:  # the text is final: later steps only fill positions past its end
                break
    except KeyboardInterrupt:
        stopped = True
    end = time.perf_counter()
    text = settled.text if settled else ""
    if view is not None and stopped:
        view.show(text)  # the settled part: what lies right of the first mask was still undecided
    elif view is None and out is not None:
        out.write(text)
    if turn is not None:
        s.history += [turn, {"role": "assistant", "content": text}]
    return Answer(s.name, text, len(settled.tokens) if settled else 0, (t_first or end) - t_start,
                  end - t_start, stopped)


class CanvasView:
    """A diffusion answer drawn in place on a terminal: each step's canvas replaces the last one."""

    def __init__(self, out) -> None:
        self.out, self.rows = out, 0

    def show(self, text: str) -> None:
        # back to the first row of the last drawing, clear to the end of the screen, draw the new one
        up = f"\x1b[{self.rows}A" if self.rows else ""
        self.out.write(f"\r{up}\x1b[J{text}")
        self.out.flush()
        width = max(1, shutil.get_terminal_size().columns)
        self.rows = sum(max(1, -(-columns(line) // width)) for line in text.split("\n")) - 1


def columns(line: str) -> int:
    """Terminal columns of a line: wide (CJK, most emoji) characters take two, combining marks none."""
    if line.isascii():
        return len(line)
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in line)


def _prompt(s: Session, prompt: str, params: SamplingParams):
    """(prompt ids, stop strings, stop ids or None for the default, the user turn or None)."""
    from lmforge.generate import encode_prompt

    if s.templated:
        return _chat_prompt(s, prompt, params)
    return encode_prompt(s.tokenizer, prompt), (), None, None


def _chat_prompt(s: Session, prompt: str, params: SamplingParams):
    """The conversation so far plus this turn, dropping the oldest turns until an answer fits."""
    from lmforge.generate import render_messages

    turn = {"role": "user", "content": prompt}
    history = list(s.history)
    room = s.model.cfg.seq_len - min(params.max_new_tokens, s.model.cfg.seq_len // 2)
    while True:
        chat = render_messages(s.tokenizer, history + [turn])
        if len(chat.ids) <= room or not history:
            break
        history = history[2:]
    if len(chat.ids) > room:
        chat.ids = chat.ids[-room:]
    s.history = history
    return chat.ids, chat.stop, chat.stop_ids, turn


def speed_summary(answers: list[Answer]) -> str:
    fastest = min(answers, key=lambda a: a.total_s)
    rate = max(answers, key=lambda a: a.tokens_per_s)
    return (f"fastest: {fastest.name} ({fastest.total_s:.2f} s); most tokens/s: {rate.name} "
            f"({rate.tokens_per_s:.1f} tokens/s)")


def _print_columns(answers: list[Answer], out) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=True)
    for a in answers:
        table.add_column(a.name, overflow="fold")
    table.add_row(*[a.text for a in answers])
    table.add_row(*[a.stats() for a in answers])
    Console(file=out, highlight=False, soft_wrap=False).print(table)


# ---- choosing checkpoints -------------------------------------------------------------------------
def _short_name(path: str) -> str:
    p = Path(path)
    if p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}/{p.name}"
    return p.name


def list_checkpoints(runs_dir: Path) -> list[tuple[Path, str]]:
    """Every checkpoint under runs_dir/*/checkpoints, newest last per run, with a best/latest label."""
    from lmforge.checkpoint import list_steps, read_state

    found = []
    for run in sorted(p for p in Path(runs_dir).iterdir() if (p / "checkpoints").is_dir()):
        root = run / "checkpoints"
        marks = {name: (root / name).resolve() for name in ("best", "latest") if (root / name).exists()}
        for step in list_steps(root):
            tags = [n for n, target in marks.items() if target == step.resolve()]
            loss = read_state(step).get("best_val_loss") if "best" in tags else None
            label = f"{run.name}/{step.name}" + (f"  ({', '.join(tags)})" if tags else "")
            found.append((step, label + (f"  val loss {loss:.3f}" if isinstance(loss, float) else "")))
    return found


def pick_checkpoints(runs_dir: Path, out=None) -> list[str]:
    """List the checkpoints of runs_dir and ask which to load (numbers, comma-separated)."""
    out = out or sys.stdout
    if not Path(runs_dir).is_dir():
        raise LmforgeError(f"{runs_dir} is not a directory; pass a checkpoint (lmforge chat CKPT) or --runs DIR")
    found = list_checkpoints(runs_dir)
    if not found:
        raise LmforgeError(f"no checkpoints under {runs_dir}; train one first (lmforge demo)")
    for i, (_, label) in enumerate(found, 1):
        out.write(f"  {i:2d}  {label}\n")
    out.flush()
    while True:
        try:
            answer = input("pick checkpoints (e.g. 1 or 1,3; empty to quit): ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return []
        if not answer:
            return []
        try:
            picks = [int(x) for x in answer.replace(" ", ",").split(",") if x]
            if picks and all(1 <= n <= len(found) for n in picks):
                return [str(found[n - 1][0]) for n in picks]
        except ValueError:
            pass
        out.write(f"numbers between 1 and {len(found)}, please\n")


def memory_warning(paths: list[str], device: torch.device) -> str | None:
    """A warning when the models (weights + a full KV cache each) will not fit in memory together."""
    from lmforge.checkpoint import read_state, resolve_checkpoint
    from lmforge.config import ModelConfig
    from lmforge.kv_cache import kv_cache_bytes
    from lmforge.models.transformer import Transformer

    need = 0
    for p in paths:
        cfg = ModelConfig.model_validate(read_state(resolve_checkpoint(p))["model_config"])
        with torch.device("meta"):
            n = Transformer(cfg).num_params()
        need += 4 * n + kv_cache_bytes(cfg, 1, cfg.seq_len)
    have = available_memory(device)
    if have is not None and need > 0.9 * have:
        return (f"the {len(paths)} models need about {need / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB "
                f"is free on {device}; loading may fail or swap")
    return None


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
