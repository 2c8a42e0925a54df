"""How close a divergence was: rounding steps of the logits' dtype, the reference's margin at the
first differing token, and the share of near-tied positions."""
import torch

from bench.run.fidelity import FidelityReference, divergence, near_tie_share, rounding_step


def test_rounding_step_is_one_ulp_of_the_dtype():
    x = torch.tensor([4.0, 5.5, -1.0, 0.75], dtype=torch.float16)
    assert rounding_step(x).tolist() == [2.0**-8, 2.0**-8, 2.0**-10, 2.0**-11]
    for v in x:  # the next representable value away from zero is exactly one step away
        nxt = torch.nextafter(v, torch.tensor(float("inf") if v > 0 else float("-inf"), dtype=torch.float16))
        assert abs(float(nxt) - float(v)) == float(rounding_step(v[None]))
    assert float(rounding_step(torch.tensor([4.0]))) == 4.0 * torch.finfo(torch.float32).eps


def _reference(logits: torch.Tensor, tokens: list[int]) -> FidelityReference:
    return FidelityReference("q", tokens, torch.log_softmax(logits.float(), -1), rounding_step(logits.max(-1).values))


def test_divergence_margin_and_near_ties():
    # three positions over a 4-token vocabulary, fp16 logits: a tie, a one-step gap, a clear winner
    logits = torch.tensor([[4.0, 4.0, 1.0, 0.0],
                           [4.0, 4.0 - 2**-8, 0.0, 0.0],
                           [4.0, 1.0, 0.0, 0.0]], dtype=torch.float16)
    ref = _reference(logits, [0, 0, 0])
    assert abs(near_tie_share(ref) - 2 / 3) < 1e-6
    assert divergence(ref, [0, 0, 0]) == {"first_divergence": None, "divergence_margin": None,
                                          "divergence_margin_steps": None}
    d = divergence(ref, [0, 1, 2])  # first differs at 1, where the reference's margin is one step
    assert d["first_divergence"] == 1
    assert abs(d["divergence_margin"] - 2**-8) < 1e-6 and abs(d["divergence_margin_steps"] - 1) < 1e-3
    d = divergence(ref, [0, 0, 1])  # a real change: 3 nats = 768 steps at logit 4
    assert d["first_divergence"] == 2 and abs(d["divergence_margin_steps"] - 768) < 0.5
