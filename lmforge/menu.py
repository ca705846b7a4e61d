"""The menu `lmforge` opens when started with no arguments in a terminal.

It lists the pipeline's commands, asks for each one's arguments (with defaults), runs the command in
a child process that owns the terminal, and offers to run another. Ctrl-C or end of input at a
question leaves the menu.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass

RECIPE = ("recipe", "recipe (TOML)", "recipes/demo.toml")
CKPT = ("ckpt", "checkpoint or run dir", "runs/demo")


@dataclass(frozen=True)
class MenuItem:
    command: tuple[str, ...]
    help: str
    args: tuple[tuple[str, str, str], ...]
    """(name, question, default); a name starting with "--" is passed as an option."""


ITEMS = (
    MenuItem(("prepare",), "raw text → cleaned documents", (RECIPE,)),
    MenuItem(("tokenizer", "train"), "train a tokenizer", (RECIPE,)),
    MenuItem(("tokenize",), "documents → token shards", (RECIPE,)),
    MenuItem(("train",), "train a model on the shards", (RECIPE,)),
    MenuItem(("eval",), "evaluate a checkpoint", (CKPT,)),
    MenuItem(("generate",), "continue a prompt", (CKPT, ("--prompt", "prompt", "ROMEO:"))),
    MenuItem(("chat",), "talk to checkpoints (interactive)", (CKPT,)),
    MenuItem(("serve",), "OpenAI-compatible HTTP server", (CKPT, ("--port", "port", "8000"))),
    MenuItem(("export",), "export a checkpoint", (CKPT, ("--format", "format (hf, safetensors, gguf)", "hf"),
                                                  ("--out", "output dir", "exports/demo"))),
)


def available_items() -> list[MenuItem]:
    """The menu entries whose commands this installation registers."""
    import typer

    from lmforge.cli import app

    root = typer.main.get_command(app)
    out = []
    for item in ITEMS:
        node = root
        for part in item.command:
            node = getattr(node, "commands", {}).get(part)
            if node is None:
                break
        if node is not None:
            out.append(item)
    return out


def _ask(question: str, default: str = "") -> str:
    answer = input(f"{question} [{default}]: " if default else f"{question}: ").strip()
    return answer or default


def build_argv(item: MenuItem) -> list[str]:
    """Ask for the item's arguments, then for any extra options; the command line to run."""
    argv = list(item.command)
    for name, question, default in item.args:
        value = _ask(question, default)
        if name.startswith("--"):
            argv += [name, value] if value else []
        elif value:
            argv.append(value)
    extra = _ask("extra options (e.g. --set train.max_steps=100), empty for none")
    return argv + shlex.split(extra)


def run_child(argv: list[str]) -> int:
    """Run `lmforge ARGV` in a child that shares the terminal; Ctrl-C reaches it, not the menu."""
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", *argv])
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # the child got the same SIGINT and decides for itself; wait for it


def run_menu() -> int:
    """The interactive menu; returns the exit code (0 after quitting, 130 on Ctrl-C)."""
    items = available_items()
    try:
        while True:
            print("\nlmforge: what would you like to do?")
            for i, item in enumerate(items, 1):
                print(f"  {i:2d}  {' '.join(item.command):<16} {item.help}")
            print("   q  quit")
            choice = input("choice: ").strip().lower()
            if choice in ("q", "quit", "exit"):
                return 0
            if not choice.isdigit() or not 1 <= int(choice) <= len(items):
                print(f"choose 1-{len(items)} or q")
                continue
            argv = build_argv(items[int(choice) - 1])
            print(f"running: lmforge {shlex.join(argv)}", flush=True)
            code = run_child(argv)
            print(f"finished with exit code {code}")
            if _ask("run another command? (y/n)", "y").lower() not in ("y", "yes"):
                return 0
    except KeyboardInterrupt:
        print("\nbye")
        return 130
    except EOFError:
        print()
        return 0
