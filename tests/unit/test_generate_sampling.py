import torch

from lmforge.generate import SamplingParams, filter_logits, sample_next


def test_top_k_keeps_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).sum() == 2
    assert torch.isfinite(out[0, [1, 3]]).all()


def test_top_p_keeps_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), top_p=0.7)
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    out = filter_logits(probs.log(), top_p=0.1)  # the top token always survives
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]


def test_greedy_and_seeded_sampling():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0), None), logits.argmax(-1))
    p = SamplingParams(temperature=1.0, top_k=10)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_next(logits, p, g1), sample_next(logits, p, g2))
