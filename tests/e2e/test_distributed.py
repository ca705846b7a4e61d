"""Data parallel (DDP) and fully sharded (FSDP2) training on 2 CPU processes with gloo, launched by
torchrun as a user would."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import tomli_w
import torch

pytestmark = pytest.mark.distributed

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lmforge", *args]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(res.stdout[-3000:] + res.stderr[-3000:])
    return res


def recipe(base, tmp: Path, run: str, **train) -> Path:
    raw = base.model_dump(mode="json")
    raw["train"].update({"max_steps": 8, "log_every": 1, "eval_every": 4, "save_every": 4, "micro_batch_size": 4,
                         "warmup_steps": 2, "sample_at_eval": False, "run_dir": str(tmp / run), **train})
    raw["eval"]["batches"] = 2
    path = tmp / f"{run}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    rows = [orjson.loads(x) for x in (run_dir / "metrics.jsonl").read_bytes().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def ddp_ref(tiny_base_recipe, tmp_path_factory):
    """An uninterrupted 8-step DDP run: (its dir, torchrun's stdout)."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = torchrun("train", str(recipe(tiny_base_recipe, tmp, "ref")))
    return tmp / "ref", out.stdout


def test_two_ranks_train_log_once_and_resume_exactly(tiny_base_recipe, ddp_ref, tmp_path):
    ref_dir, stdout = ddp_ref
    assert "world size 2" in stdout
    assert stdout.count("step 8/8 |") == 1  # only rank 0 logs
    ref_losses = losses(ref_dir)
    assert sorted(ref_losses) == list(range(1, 9))
    state = orjson.loads((ref_dir / "checkpoints/step_000008/state.json").read_bytes())
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


@pytest.mark.slow  # 45 s; tests/unit/test_ddp.py checks FSDP's sharding and its step in the default suite
def test_fsdp_matches_ddp_resumes_exactly_and_loads_in_one_process(tiny_base_recipe, ddp_ref, tmp_path):
    ref_dir, _ = ddp_ref
    ddp_losses = losses(ref_dir)
    run = recipe(tiny_base_recipe, tmp_path, "fsdp", parallel="fsdp", sample_at_eval=True)
    res = torchrun("train", str(run), "--stop-at", "4", check=False)
    assert res.returncode != 0 and "--resume" in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
    out = torchrun("train", str(run), "--resume")
    assert "resumed from" in out.stdout and out.stdout.count("step 8/8 |") == 1
    fsdp_losses = losses(tmp_path / "fsdp")
    # the same weights, data and global batch as DDP: only the order of float sums differs
    assert sorted(fsdp_losses) == list(range(1, 9))
    for step in range(1, 9):
        assert fsdp_losses[step] == pytest.approx(ddp_losses[step], rel=1e-4, abs=1e-5), step

    ckpt = tmp_path / "fsdp/checkpoints/step_000008"
    state = orjson.loads((ckpt / "state.json").read_bytes())
    assert state["sharded"] and state["world_size"] == 2 and len(state["rng"]) == 2
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(state["files"])
    assert not (ckpt / "model.safetensors").exists()  # each rank wrote its own shards, nobody the whole
    # the final evaluation (rank 0 on a gathered copy, every token) agrees with DDP's (split and reduced)
    final = orjson.loads((tmp_path / "fsdp/eval/final.json").read_bytes())
    ddp_final = orjson.loads((ref_dir / "eval/final.json").read_bytes())
    assert final["tokens"] == ddp_final["tokens"]
    assert final["loss"] == pytest.approx(ddp_final["loss"], rel=1e-4)
    assert "=== step 4 |" in (tmp_path / "fsdp/samples.txt").read_text()

    # one process, no process group: the sharded checkpoint exports to a plain safetensors model
    exported = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "lmforge", "export", str(tmp_path / "fsdp"), "--format", "safetensors",
                    "--out", str(exported)], env=ENV, check=True, capture_output=True, text=True, timeout=120)
    from safetensors.torch import load_file

    from lmforge.sft import base_weights, load_base

    mine = load_file(str(exported / "model.safetensors"))
    theirs = load_file(str(ref_dir / "checkpoints/step_000008/model.safetensors"))
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        assert (mine[k] - v).abs().max() < 1e-3, k
    for k, v in base_weights(load_base(tmp_path / "fsdp")).items():  # SFT can start from it too
        assert torch.equal(v, mine[k]), k
    gen = subprocess.run([sys.executable, "-m", "lmforge", "generate", str(tmp_path / "fsdp"), "--prompt", "ROMEO:",
                          "--max-new-tokens", "8", "--temperature", "0"], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert gen.returncode == 0 and gen.stdout.startswith("ROMEO:"), gen.stderr[-2000:]
