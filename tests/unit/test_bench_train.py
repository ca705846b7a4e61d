import pytest

from lmforge.bench_train import Setting, bench_train, parse_compare
from lmforge.config import ModelConfig
from lmforge.models.transformer import Transformer


def test_parse_compare_builds_variants():
    base = Setting()
    names = [s.name for s in parse_compare("dtype,optimizer", base)]
    assert names == ["fp32 eager adamw-foreach", "bf16 eager adamw-foreach", "fp32 eager adamw-plain",
                     "fp32 eager adamw-fused"]
    with pytest.raises(ValueError, match="unknown axis"):
        parse_compare("speed", base)


def test_bench_train_reports_a_consistent_split():
    cfg = ModelConfig(preset="tiny", vocab_size=128)
    res = bench_train(cfg, [Setting(), Setting(optimizer="plain")], batch=2, steps=3, warmup=1, device="cpu")
    assert res["machine"]["peak_fp32_tflops"] > 0
    first, second = res["results"]
    assert first["speedup"] == 1.0
    parts = first["ms_data"] + first["ms_forward"] + first["ms_backward"] + first["ms_optimizer"]
    assert parts == pytest.approx(first["ms_per_step"], rel=0.5)
    assert first["tokens_per_s"] == pytest.approx(2 * 64 / (first["ms_per_step"] / 1000))
    assert 0 < first["mfu"] < 2
    assert first["flops_per_token"] == Transformer(cfg).flops_per_token()
