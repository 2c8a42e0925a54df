"""Transformers' arithmetic on the static engines (bench.engines.exact): what an engine over an
ExactDecoder does differently from the static engine, and the eager engine that does it.

The logits are bit-identical to the hf engine's, one request at a time; suffixes after a prefix
hit run at their exact length (no buckets) and every call attends over exactly the keys so far,
as transformers does. `StaticExactEngine` runs its calls eagerly (anywhere: the CPU tests check
it against the hf engine); the graph-exact engine (bench.engines.graph_exact) captures them.
"""
from __future__ import annotations

from bench.engines import row_mean
from bench.engines.exact import ExactDecoder, ExactLayers
from bench.engines.decoder import fast_decoder
from bench.engines.static import StaticEngine
from bench.errors import VariantUnsupported
from bench.quant.w4a16.choice import DEFAULT


class ExactRequests:
    """The overrides of StaticEngine (and its subclasses) that make an engine do transformers'
    arithmetic: put first among the bases, before the engine class it changes."""

    def _make_decoder(self) -> ExactDecoder:
        return fast_decoder(self.adapter, ExactDecoder, attention=self.spec.attention)

    def _eager_layers(self) -> tuple:
        layers = ExactLayers(self.decoder)
        return layers.at, layers.from_

    def _int4_prefill_kernel(self) -> str:
        """The dense prefill path, whatever --int4-prefill-kernel says (as _int4_kernel_mode)."""
        return "dense"

    def _int4_kernel_mode(self) -> str:
        """The default int4 kernels, whatever --int4-kernels says: the hf engine's modules run
        them, and another kernel rounds otherwise (the int4_kernels column says which ran)."""
        return DEFAULT

    def arithmetic_note(self) -> str:
        found = [n for n in (self._step_layer().__self__.describe(), row_mean.describe()) if n]
        return ", transformers' arithmetic (its attention call over exactly the keys so far" + \
            "".join(f"; {n}" for n in found) + ")"

    def _check_batch(self, batch: int) -> None:
        if batch != 1:
            raise VariantUnsupported(f"the {self.name} engine runs one request at a time (it does not reproduce "
                                     f"transformers' padded-batch masks); this point batches {batch}")

    def bucket(self, tokens: int) -> int | None:
        """A suffix runs at its own length (None if longer than the largest bucket)."""
        return tokens if tokens <= self.spec.suffix_buckets[-1] else None

    def key_len(self, start: int, bucket: int) -> int:
        """Exactly the tokens so far, as transformers."""
        return start + bucket

    def _decode_key_len(self, cache) -> int | None:
        return cache.get_seq_length() + 1  # over exactly the keys so far


class StaticExactEngine(ExactRequests, StaticEngine):
    """The eager engine of graph-exact's calls (graph-exact needs CUDA)."""
    name = "static-exact"
