"""Exact resume: a run stopped at step N (any way) and resumed equals the uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import tomli_w

from lmforge.checkpoint import list_steps

STEPS = 24
TRAIN = {"max_steps": STEPS, "log_every": 1, "eval_every": 8, "save_every": 4, "micro_batch_size": 4,
         "warmup_steps": 3}


def write_recipe(tiny_recipe, path: Path, run_dir: Path, **train) -> Path:
    raw = tiny_recipe.model_dump(mode="json")
    raw["train"].update({**TRAIN, **train})
    raw["train"]["run_dir"] = str(run_dir)
    raw["train"]["sample_at_eval"] = False
    raw["model"]["dropout"] = 0.1  # dropout draws from the torch RNG: resume must restore it
    path.write_text(tomli_w.dumps(raw))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    rows = [orjson.loads(x) for x in (run_dir / "metrics.jsonl").read_bytes().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def train_cmd(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", "train", str(recipe), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def reference(tiny_recipe_module, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    recipe = write_recipe(tiny_recipe_module, tmp / "r.toml", tmp / "run")
    subprocess.run(train_cmd(recipe), env=ENV, check=True, capture_output=True, timeout=300)
    ref = losses(tmp / "run")
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


@pytest.fixture(scope="module")
def tiny_recipe_module(tiny_base_recipe):
    return tiny_base_recipe


def resume_and_compare(recipe: Path, run_dir: Path, reference: dict[int, float]) -> int:
    stopped_at = int(os.readlink(run_dir / "checkpoints" / "latest").split("_")[1])
    res = subprocess.run(train_cmd(recipe, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    after = losses(run_dir)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(stopped_at + 1, STEPS + 1):
        assert after[step] == reference[step], f"step {step}: {after[step]} != {reference[step]}"
    return stopped_at


def test_stop_at_then_resume_is_bit_identical(tiny_recipe_module, reference, tmp_path):
    recipe = write_recipe(tiny_recipe_module, tmp_path / "r.toml", tmp_path / "run")
    res = subprocess.run(train_cmd(recipe, "--stop-at", "10"), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 130 and "--resume" in res.stderr
    assert resume_and_compare(recipe, tmp_path / "run", reference) == 10


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir) or {0: 0}) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"never reached step {step}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_is_bit_identical(tiny_recipe_module, reference, tmp_path, sig):
    recipe = write_recipe(tiny_recipe_module, tmp_path / "r.toml", tmp_path / "run", save_every=1000)
    proc = subprocess.Popen(train_cmd(recipe), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "run", 6, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    stopped = resume_and_compare(recipe, tmp_path / "run", reference)
    assert 6 <= stopped < STEPS


def test_sigkill_after_checkpoint_resumes_from_it(tiny_recipe_module, reference, tmp_path):
    recipe = write_recipe(tiny_recipe_module, tmp_path / "r.toml", tmp_path / "run")
    proc = subprocess.Popen(train_cmd(recipe), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(tmp_path / "run", 9, proc)
    proc.kill()
    proc.wait()
    stopped = resume_and_compare(recipe, tmp_path / "run", reference)
    assert stopped % 4 == 0 and stopped >= 8


@pytest.mark.slow
def test_random_kills_during_saves_never_corrupt(tiny_recipe_module, tmp_path):
    import random

    from lmforge.checkpoint import verify_files
    from lmforge.resume import find_resumable

    recipe = write_recipe(tiny_recipe_module, tmp_path / "r.toml", tmp_path / "run", save_every=1,
                          max_steps=100000, eval_every=100000)
    rng = random.Random(0)
    first = True
    for _ in range(20):
        proc = subprocess.Popen(train_cmd(recipe, *([] if first else ["--resume"])), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = False
        wait_for_step(tmp_path / "run", 1, proc)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.wait()
        ckpt = find_resumable(tmp_path / "run" / "checkpoints", lambda _m: None)
        verify_files(ckpt)
    assert list_steps(tmp_path / "run" / "checkpoints")
