"""Token merging (ToMe, Bolya et al. 2023: bipartite soft matching) as InternVideo2.5 applies it to
a group of frames' visual tokens before its projector: the group's tokens are merged, step by step,
down to a fixed count.

One step on tokens x (with sizes s, how many original tokens each stands for): the tokens split
alternately into sets A (even positions) and B (odd); each A token's match is its most similar B
token by the cosine of `metric`; the r A tokens with the most similar matches are added into their
matches, weighted by size, and the rest of A is kept. The result is [kept A tokens, B tokens], each
the size-weighted mean of what it absorbed. The metric is the tokens themselves, their channels
averaged over `heads` equal chunks.
"""
from __future__ import annotations

import torch


def merge_schedule(tokens: int, target: int) -> list[int]:
    """Tokens removed per step to go from `tokens` to `target`, at most half of them per step."""
    if not 0 < target < tokens:
        raise ValueError(f"cannot merge {tokens} tokens down to {target}")
    steps = []
    while tokens != target:
        r = min(tokens - target, tokens // 2)
        steps.append(r)
        tokens -= r
    return steps


def _merge_step(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # [groups, |A|, |B|]
    best, match = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)[..., None]
    kept, moved = order[:, r:], order[:, :r]
    into = match[..., None].gather(1, moved)

    # The moved tokens are summed into their matches by a one-hot matrix product, not scatter_add:
    # several A tokens can match one B token, and CUDA's scatter_add adds them with atomics in no
    # fixed order, so the same frames gave different tokens run to run (on the H200 an fp16 run's
    # teacher-forced KL against itself was 0.08 on internvideo2.5-8b); the product is deterministic.
    onehot = torch.nn.functional.one_hot(into[..., 0], x.shape[1] // 2).to(x.dtype).transpose(1, 2)  # [n, |B|, r]

    def merge(t: torch.Tensor) -> torch.Tensor:
        a, b = t[:, ::2], t[:, 1::2]
        n, _, c = a.shape
        stay = a.gather(1, kept.expand(n, kept.shape[1], c))
        b = b + onehot @ a.gather(1, moved.expand(n, r, c))  # [n, |B|, r] @ [n, r, c]
        return torch.cat([stay, b], dim=1)

    total, size = merge(x * size), merge(size)
    return total / size, size


def merge_tokens(x: torch.Tensor, target: int, heads: int) -> torch.Tensor:
    """x: [groups, tokens, channels] -> [groups, target, channels]."""
    groups, tokens, channels = x.shape
    size = torch.ones_like(x[..., :1])
    for r in merge_schedule(tokens, target):
        metric = x.reshape(groups, x.shape[1], heads, channels // heads).mean(2)
        x, size = _merge_step(x, size, metric, r)
    return x
