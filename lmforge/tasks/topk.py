"""Next-token top-1/5/10 accuracy on the same windows as `loss` (one pass serves both tasks)."""

from __future__ import annotations

from lmforge.tasks import Progress, TaskOptions, TaskResult
from lmforge.tasks import loss as _loss
from lmforge.tasks.scoring import EvalModel

METRICS = {"top1": True, "top5": True, "top10": True}
PRIMARY = "top1"


def load(opts: TaskOptions) -> _loss.LMData:
    return _loss.load(opts, "topk")


def run(em: EvalModel, data: _loss.LMData, opts: TaskOptions, progress: Progress) -> TaskResult:
    return _loss.result_for(em, data, opts, progress, list(METRICS))
