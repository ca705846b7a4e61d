"""`lmforge eval` and `lmforge bench eval` as a user runs them: subprocesses on a run dir with two
checkpoints and a Hugging Face export, on the real-data samples from ../shared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import torch

SAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "samples"
pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/data/samples is not here")
# the eval commands register themselves when lmforge.cli_eval is imported
ENTRY = "import sys, lmforge.cli_eval; from lmforge.cli import main; sys.exit(main(sys.argv[1:]))"


def lmforge(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", ENTRY, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir, tiny_shards_dir):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import ModelConfig
    from lmforge.export import export_checkpoint
    from lmforge.models.transformer import Transformer

    root = tmp_path_factory.mktemp("evalcli")
    cfg = ModelConfig(preset="tiny", vocab_size=512)
    for step in (1, 2):
        torch.manual_seed(step)
        state = {"model_config": cfg.model_dump(mode="json"), "recipe": {"data": {"shards_dir": str(tiny_shards_dir)}}}
        save_checkpoint(root / "run" / "checkpoints", step, Transformer(cfg), state, tokenizer_dir=tiny_tokenizer_dir)
    export_checkpoint(root / "run" / "checkpoints" / "step_000001", root / "hf", "hf", log=lambda _: None)
    return root


def test_eval_many_checkpoints_and_an_hf_dir(models):
    res = lmforge("eval", "run", "hf", "--all-checkpoints", "--preset", "quick", "--limit", "loss=4",
                  "--tasks", "loss,topk,lambada,hellaswag",
                  "--task-data", f"loss={SAMPLES / 'wikitext2_test_sample.txt'}",
                  "--task-data", f"lambada={SAMPLES / 'lambada_sample.jsonl'}",
                  "--task-data", f"hellaswag={SAMPLES / 'hellaswag_val_sample.jsonl'}",
                  "--json", "out.json", cwd=models)
    assert res.returncode == 0, res.stderr
    for title in ("loss", "topk", "lambada", "hellaswag", "ranking"):
        assert title in res.stdout
    assert "run@1" in res.stdout and "run@2" in res.stdout and "hf" in res.stdout
    data = orjson.loads((models / "out.json").read_bytes())
    assert [c["name"] for c in data["checkpoints"]] == ["run@1", "run@2", "hf"]
    assert [c["format"] for c in data["checkpoints"]] == ["lmforge", "lmforge", "hf"]
    rows = {(r["checkpoint"], r["task"]): r for r in data["results"]}
    assert len(rows) == 12
    assert rows[("run@1", "lambada")]["n"] == 20 and rows[("run@1", "hellaswag")]["n"] == 10
    assert rows[("run@1", "loss")]["n"] == 4 and rows[("run@1", "topk")]["n"] == 4
    assert set(rows[("hf", "hellaswag")]["metrics"]) == {"acc", "acc_norm"}
    # the HF export of step 1 is the same model: the same numbers
    for task in ("loss", "lambada", "hellaswag"):
        a, b = rows[("run@1", task)]["metrics"], rows[("hf", task)]["metrics"]
        assert all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a), task
    saved = sorted((models / "run" / "eval").iterdir())
    assert [p.suffix for p in saved] == [".json", ".txt"] and "hellaswag" in saved[1].read_text()


def test_missing_file_and_malformed_record_are_user_errors(models, tmp_path):
    res = lmforge("eval", "run", "--tasks", "lambada", cwd=models)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "--task-data lambada=PATH" in res.stderr and "lambada_test.jsonl" in res.stderr
    res = lmforge("eval", "run", "--task-data", f"hellaswag={tmp_path / 'hs.jsonl'}", cwd=models)
    assert res.returncode == 1 and "hs.jsonl is not a file" in res.stderr and "rowanz/hellaswag" in res.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine passage"}\n{"text": \n', encoding="utf-8")
    res = lmforge("eval", "run", "--tasks", "lambada", "--task-data", f"lambada={bad}", "--strict", cwd=models)
    assert res.returncode == 1 and "bad.jsonl:2: malformed" in res.stderr


def test_help_says_what_each_task_needs(models):
    res = lmforge("eval", "--help", cwd=models)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for needle in ("lambada_test.jsonl", "hellaswag", "validation shards", "completion"):
        assert needle in text


def test_bench_eval_writes_json(models):
    res = lmforge("bench", "eval", "run", "--data", SAMPLES / "hellaswag_val_sample.jsonl", "--examples", "4",
                  "--batch-size", "4", "--json", "bench.json", cwd=models)
    assert res.returncode == 0, res.stderr
    data = orjson.loads((models / "bench.json").read_bytes())
    assert [r["name"] for r in data["results"]] == ["unbatched", "shared context", "batched"]
    assert all(r["examples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["max_abs_diff"] < 1e-4
               for r in data["results"])
