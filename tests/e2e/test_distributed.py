"""Data parallel on 2 CPU processes with gloo, launched by torchrun as a user would."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import tomli_w

pytestmark = pytest.mark.distributed

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lmforge", *args]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(res.stdout[-3000:] + res.stderr[-3000:])
    return res


def recipe(base, tmp: Path, run: str) -> Path:
    raw = base.model_dump(mode="json")
    raw["train"].update({"max_steps": 8, "log_every": 1, "eval_every": 4, "save_every": 4, "micro_batch_size": 4,
                         "warmup_steps": 2, "sample_at_eval": False, "run_dir": str(tmp / run)})
    raw["eval"]["batches"] = 2
    path = tmp / f"{run}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    rows = [orjson.loads(x) for x in (run_dir / "metrics.jsonl").read_bytes().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_two_ranks_train_log_once_and_resume_exactly(tiny_base_recipe, tmp_path):
    ref = recipe(tiny_base_recipe, tmp_path, "ref")
    out = torchrun("train", str(ref))
    assert "world size 2" in out.stdout
    assert out.stdout.count("step 8/8 |") == 1  # only rank 0 logs
    ref_losses = losses(tmp_path / "ref")
    assert sorted(ref_losses) == list(range(1, 9))
    state = orjson.loads((tmp_path / "ref/checkpoints/step_000008/state.json").read_bytes())
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and len(state["loader"]) == 2
    assert state["tokens_seen"] == 8 * 2 * 4 * 64  # steps * ranks * batch * seq_len

    run = recipe(tiny_base_recipe, tmp_path, "run")
    res = torchrun("train", str(run), "--stop-at", "4", check=False)
    assert res.returncode != 0 and "--resume" in res.stderr
    torchrun("train", str(run), "--resume")
    after = losses(tmp_path / "run")
    for step in range(5, 9):
        assert after[step] == ref_losses[step]

    single = recipe(tiny_base_recipe, tmp_path, "single")
    res = subprocess.run([sys.executable, "-m", "lmforge", "train", str(single), "--resume"], env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 1 and "nothing to resume" in res.stderr
    # resuming a 2-rank run with 1 process would change the global batch: refused
    shutil.copytree(tmp_path / "run" / "checkpoints", tmp_path / "single" / "checkpoints", symlinks=True)
    res = subprocess.run([sys.executable, "-m", "lmforge", "train", str(single), "--resume"], env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 1 and "world_size: 2 -> 1" in res.stderr
