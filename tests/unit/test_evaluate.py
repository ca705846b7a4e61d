"""Loss/bpb/top-k arithmetic on hand-computed examples, sliding windows, the loss task on shards and
text, resolving checkpoints, and the report (tables, ranking, JSON)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.evaluate import EvalRun, evaluate_lm, evaluate_loss, load_eval_model, resolve_targets
from lmforge.models.transformer import Transformer
from lmforge.tasks import Progress, TaskOptions, TaskResult
from lmforge.tasks import loss as loss_task

CPU = torch.device("cpu")


class FixedLogits(nn.Module):
    """Every position predicts the same distribution, so each token's log-prob is known by hand."""

    def __init__(self, probs: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(probs).log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*x.shape, -1)


def test_bits_per_byte_hand_computed():
    # p = (1/2, 1/4, 1/8, 1/8): targets 0, 1, 2, 3 cost 1, 2, 3, 3 bits; token 3 is special (0 bytes)
    model = FixedLogits([0.5, 0.25, 0.125, 0.125])
    token_bytes = torch.tensor([2, 2, 1, 0])
    y = torch.tensor([[0, 1, 2, 3]])
    res = evaluate_lm(model, [(torch.zeros_like(y), y)], token_bytes, device=CPU)
    assert res["tokens"] == 4 and res["bytes"] == 5
    assert res["loss"] == pytest.approx(9 / 4 * math.log(2))  # nats per token, every token
    assert res["perplexity"] == pytest.approx(2 ** (9 / 4))
    assert res["bpb"] == pytest.approx((1 + 2 + 3) / 5)  # text tokens only: 6 bits over 5 bytes
    assert res["top1"] == pytest.approx(1 / 4) and res["top5"] == res["top10"] == 1.0
    # the mask drops targets already scored by an overlapping window: only 2 and 3 remain
    masked = evaluate_lm(model, [(torch.zeros_like(y), y, torch.tensor([[False, False, True, True]]))],
                         token_bytes, device=CPU)
    assert masked["tokens"] == 2 and masked["bytes"] == 1 and masked["bpb"] == pytest.approx(3.0)
    assert masked["loss"] == pytest.approx(3 * math.log(2))


def test_evaluate_loss_keeps_its_contract():
    model = FixedLogits([0.5, 0.25, 0.125, 0.125])
    y = torch.tensor([[0, 1, -1, 3]])  # -1: no target
    res = evaluate_loss(model, [(torch.zeros_like(y), y)], torch.tensor([1, 1, 1, 1]), device=CPU, max_batches=1)
    assert set(res) == {"loss", "perplexity", "bpb", "tokens", "bytes"}
    assert res["tokens"] == 3 and res["loss"] == pytest.approx(6 / 3 * math.log(2))
    empty = evaluate_loss(model, [], torch.tensor([1, 1, 1, 1]), device=CPU)
    assert empty["tokens"] == 0 and math.isnan(empty["loss"])


@pytest.mark.parametrize("n,seq_len,stride", [(2, 8, 8), (10, 8, 8), (100, 16, 5), (100, 16, 16), (37, 8, 3)])
def test_windows_score_every_target_once(n, seq_len, stride):
    counted = [0] * n
    for s, t, first in loss_task.plan_windows(n, seq_len, stride):
        assert t <= seq_len and s + t <= n - 1
        for j in range(first, t):
            counted[s + 1 + j] += 1
    assert counted == [0] + [1] * (n - 1)


def make_run(root: Path, tok_dir: Path, shards_dir: Path, steps=(1, 2)) -> Path:
    cfg = ModelConfig(preset="tiny", vocab_size=512)
    for step in steps:
        torch.manual_seed(step)
        model = Transformer(cfg)
        state = {"model_config": cfg.model_dump(mode="json"),
                 "recipe": {"data": {"shards_dir": str(shards_dir)}}}
        save_checkpoint(root / "checkpoints", step, model, state, tokenizer_dir=tok_dir, keep=10)
    return root


def test_loss_task_on_shards_matches_the_training_loader(tmp_path, tiny_tokenizer_dir, tiny_shards_dir):
    from lmforge.loaders.memmap import MemmapLoader

    em = load_eval_model(make_run(tmp_path / "run", tiny_tokenizer_dir, tiny_shards_dir, (1,)))
    assert em.name == "run@1" and em.shards_dir == str(tiny_shards_dir)
    opts = TaskOptions(stride=48)
    res = loss_task.run(em, loss_task.load(opts), opts, Progress())
    loader = MemmapLoader(tiny_shards_dir, "val", 16, 64, mode="sequential", stride=48)
    ref = evaluate_loss(em.model, loader.iter_eval(), torch.as_tensor(em.tokenizer.token_bytes()), device=CPU)
    for k in ("loss", "bpb", "tokens", "bytes"):
        assert res.metrics[k] == pytest.approx(ref[k], rel=1e-6)
    assert res.n == len(loader._windows) and "stride 48" in res.notes[0]
    sub = loss_task.run(em, loss_task.load(opts), TaskOptions(stride=48, limit=3), Progress())
    assert sub.n == 3 and sub.metrics["tokens"] < res.metrics["tokens"]


def test_loss_on_text_and_jsonl_and_missing_shards(tmp_path, tiny_tokenizer_dir, tiny_shards_dir, shakespeare):
    em = load_eval_model(make_run(tmp_path / "run", tiny_tokenizer_dir, tiny_shards_dir, (1,)))
    text = tmp_path / "t.txt"
    text.write_text(shakespeare[:3000], encoding="utf-8")
    res = loss_task.run(em, loss_task.load(TaskOptions(str(text))), TaskOptions(str(text)), Progress())
    assert res.metrics["bytes"] == len(shakespeare[:3000].encode()) and res.data == str(text)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "First Citizen: hello"}\n{"text": "Second: bye"}\n', encoding="utf-8")
    res = loss_task.run(em, loss_task.load(TaskOptions(str(jsonl))), TaskOptions(str(jsonl)), Progress())
    assert res.metrics["bytes"] == len("First Citizen: hello") + len("Second: bye")
    em.shards_dir = None
    res = loss_task.run(em, loss_task.load(TaskOptions()), TaskOptions(), Progress())
    assert res.error and "--task-data loss=FILE" in res.error


def test_resolve_targets(tmp_path, tiny_tokenizer_dir, tiny_shards_dir):
    run = make_run(tmp_path / "run", tiny_tokenizer_dir, tiny_shards_dir, (1, 2, 3))
    assert resolve_targets([run]) == [run.resolve()]
    steps = resolve_targets([run], all_checkpoints=True)
    assert [p.name for p in steps] == ["step_000001", "step_000002", "step_000003"]
    assert [p.name for p in resolve_targets([str(run / "checkpoints" / "step_00000[12]")])] == \
        ["step_000001", "step_000002"]
    with pytest.raises(CheckpointError, match="matches nothing"):
        resolve_targets([str(tmp_path / "none*")])
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_targets([tmp_path / "missing"])


def fake_run() -> EvalRun:
    run = EvalRun(["loss", "hellaswag"])
    run.models = [{"name": n, "tokenizer": t, "run_dir": None} for n, t in (("a", "x"), ("b", "y"), ("c", "x"))]
    for name, bpb, acc in (("a", 1.5, 0.30), ("b", 1.2, 0.30), ("c", 1.9, 0.25)):
        run.results[(name, "loss")] = TaskResult({"loss": 3.0, "perplexity": 20.0, "bpb": bpb}, 10, data="d")
        run.results[(name, "hellaswag")] = TaskResult({"acc": acc, "acc_norm": acc}, 10, truncated=2)
    return run


def test_ranking_table_and_json(tmp_path):
    from lmforge.eval_report import ranking, report_text, to_json, write_outputs

    run = fake_run()
    rank = ranking(run)
    assert [r["checkpoint"] for r in rank] == ["b", "a", "c"]  # b: best bpb, tied best acc_norm
    assert rank[0]["mean_rank"] == 1.0 and rank[1]["mean_rank"] == 1.5
    run.tasks.append("topk")  # per token: out of the ranking while the tokenizers differ
    for name, top1 in (("a", 0.9), ("b", 0.1), ("c", 0.5)):
        run.results[(name, "topk")] = TaskResult({"top1": top1, "top5": 1.0, "top10": 1.0}, 10, data="d")
    assert ranking(run) == rank
    text = report_text(run)
    assert "different tokenizers" in text and "bits per byte does" in text and "cut on the left" in text
    data = to_json(run)
    row = next(r for r in data["results"] if r["checkpoint"] == "b" and r["task"] == "loss")
    assert row["metrics"]["bpb"] == 1.2 and row["n"] == 10
    written = write_outputs(run, out=tmp_path / "o", json_path=tmp_path / "r.json", log=lambda _: None)
    assert (tmp_path / "r.json").is_file() and len(written) == 3


def test_best_value_is_highlighted():
    from lmforge.eval_report import task_table

    cells = task_table(fake_run(), "loss").columns[2]._cells  # column "b"
    assert "bold green" in cells[2] and "bold green" not in cells[0]  # best bpb; losses all tie
