"""The `graph-exact` engine: the graph engine (bench.engines.graph) doing transformers'
arithmetic (bench.engines.exact, bench.engines.static_exact), so its logits are bit-identical to
the hf engine's and its greedy tokens too, near-ties and all (with random weights `graph` leaves
hf's tokens at the first exact tie); the price is in GraphExactEngine.
"""
from __future__ import annotations

import torch

from bench.engines.exact import ExactLayers
from bench.engines.fused_linear import FUSED_MAX_ROWS
from bench.engines.graph import GraphEngine
from bench.engines.spec import EngineSpec
from bench.engines.static_exact import ExactRequests


class GraphExactEngine(ExactRequests, GraphEngine):
    """The graph engine doing transformers' arithmetic (ExactRequests), so that its greedy
    tokens are the hf engine's, ties and all, at graph speed less what exactness costs:
    - layers compiled with "eager-exact" numerics (bit-identical to eager), in parts between
      their GEMM groups and transformers' own attention call, which runs eagerly over exactly
      the keys so far (bench.engines.exact.ExactLayers);
    - projections fused only where bit-equal to the separate GEMMs transformers runs; a step's
      separate ones side by side on two side streams (the spec's `concurrent_projections`);
    - one decode graph per attended length (the attention call's shape changes every token:
      flash attention's key blocks and split count follow it), all in one memory pool; a graph
      is captured the first time a length is reached (a warm-up request captures a request's);
    - suffixes after a cached prefix at their exact length (a graph per length and start), the
      full prompt captured per exact length (no padding, prefill_round 1), one request at a time.
    """
    name = "graph-exact"
    # concurrent_projections: a step's separate q/k/v (gate/up) GEMMs run side by side
    # (FusedProjections.forward): separately they are narrower GEMVs that each read at a lower rate
    # than the fused one they replace. fused_max_rows: the exact decoder fuses no more rows anyway.
    default_spec = EngineSpec(numerics="eager-exact", prefill_round=1, fused_max_rows=FUSED_MAX_ROWS,
                              concurrent_projections=True, batch_prefill_tokens=0)  # one request at a time

    def _split_kv(self) -> bool:
        return False  # transformers' own attention call, whatever --decode-attention says

    def _compiled_step_layer(self, compile):  # transformers' additions, each where it makes them
        self._exact_layers = ExactLayers(self.decoder, compile, self._projection_streams())
        return self._exact_layers.at

    def _compiled_prefill_layer(self, compile):
        return self._exact_layers.from_

    def _compiled(self, layer_fn) -> bool:
        owner = getattr(layer_fn, "__self__", None)
        return layer_fn is not None and (owner.compiled if isinstance(owner, ExactLayers) else True)

    def _graphs_note(self) -> str:
        return "CUDA-graph decode (a graph per attended length) + suffixes (a graph per length and start)"

    def _projection_streams(self) -> list | None:
        """Side streams for the layers' separate GEMMs (FusedProjections.forward); None: in turn."""
        if not self.spec.concurrent_projections or self.adapter.device.type != "cuda":
            return None
        return [torch.cuda.Stream(self.adapter.device) for _ in range(2)]  # the widest group has 3 GEMMs

    def arithmetic_note(self) -> str:
        side = (", separate projections of a step side by side on 3 streams"
                if self.spec.concurrent_projections and "separate" in self.decoder.fusion else "")
        return super().arithmetic_note() + side
