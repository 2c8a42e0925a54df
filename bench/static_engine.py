"""Engines over a preallocated static KV cache.

- `static`: transformers' StaticCache (one buffer per layer, allocated once and reused by every
  request), eager forward passes. Runs anywhere; it is the decode loop `graph` replays.
- `graph`: the same, with the decode step captured once in a CUDA graph (torch.cuda.CUDAGraph)
  and replayed per token, which removes the per-kernel CPU launch cost that bounds eager decode.
  The step reads the token embedding from a fixed buffer and writes the next one back, so the
  replays chain on the GPU; the cache's write position is a device tensor inside the graph.

Prefill stays eager (variable length) with SDPA. Prefix reuse copies the cached prefix into
the static buffers (bench.cache_policy / variants.prefix).
"""
from __future__ import annotations

import torch
from transformers import StaticCache

from bench.engine import HFEngine
from bench.errors import VariantUnsupported
from bench.timing import Timeline

CACHE_ROUND = 256  # buffer length granularity; a longer request reallocates (and recaptures)


class StaticEngine(HFEngine):
    name = "static"

    def __init__(self, adapter, policy):
        super().__init__(adapter, policy)
        self.cache: StaticCache | None = None
        self.max_len = 0

    def new_cache(self, prompt_tokens: int, max_new_tokens: int):
        need = prompt_tokens + max_new_tokens
        if self.cache is None or need > self.max_len:
            self.max_len = -(-need // CACHE_ROUND) * CACHE_ROUND
            self._drop_buffers()
            self.cache = StaticCache(config=self.adapter.text_config(), max_cache_len=self.max_len)
        else:
            # Rewind the write positions in place (same device tensors the graph captured).
            # Stale keys/values need no zeroing: the attention mask never admits positions
            # past the write position, and every slot is written before it is admitted.
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.cumulative_length.zero_()
        return self.cache

    def _drop_buffers(self) -> None:
        self.cache = None


class GraphEngine(StaticEngine):
    name = "graph"

    def __init__(self, adapter, policy):
        if adapter.device.type != "cuda":
            raise VariantUnsupported("the graph engine needs a CUDA device")
        super().__init__(adapter, policy)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _drop_buffers(self) -> None:
        self.graph = None  # its captured addresses die with the old cache
        super()._drop_buffers()

    def _write_positions(self) -> list[torch.Tensor]:
        return [layer.cumulative_length for layer in self.cache.layers]

    def _step(self) -> None:
        logits = self.adapter.lm_forward(self.step_embeds, self.cache)
        self.step_token.copy_(logits[:, -1].argmax(-1))
        self.step_embeds.copy_(self.adapter.input_embeddings()(self.step_token[:, None]))

    def _capture(self, token: torch.Tensor) -> None:
        emb = self.adapter.input_embeddings()
        self.step_token = token.clone()
        self.step_embeds = emb(token[:, None]).clone()
        saved = [p.clone() for p in self._write_positions()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, lazy init)
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
        except Exception as e:  # a kernel that cannot be captured: say so, never fall back to eager
            raise VariantUnsupported(f"decode step cannot be captured in a CUDA graph: "
                                     f"{e.__class__.__name__}: {str(e)[:200]}") from e
        # The warm-up steps wrote keys/values past the prompt; rewind the write positions (the
        # stale entries are overwritten by the real steps before anything attends to them).
        for p, s in zip(self._write_positions(), saved):
            p.copy_(s)
        self.graph = graph

    def decode(self, token: torch.Tensor, cache, steps: int, tl: Timeline) -> list[torch.Tensor]:
        if steps == 0:
            return []
        if self.graph is None:
            self._capture(token)
        self.step_token.copy_(token)
        self.step_embeds.copy_(self.adapter.input_embeddings()(token[:, None]))
        out = []
        for _ in range(steps):
            self.graph.replay()
            out.append(self.step_token.clone())
            tl.mark("decode")
        return out
