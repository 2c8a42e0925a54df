"""Engines over preallocated KV buffers, driven by our own decoder forward (bench.engines.decoder).

- `static`: KV buffers allocated once and reused by every request; eager calls. Runs anywhere
  (the CPU tests check its greedy tokens against transformers' generate); it is exactly the
  sequence of calls `graph` captures.
- `graph`: the same calls, captured in CUDA graphs and replayed:
  * the decode step (one token; embedding of the next token written back on the GPU, so replays
    chain without the host), with each decoder layer compiled by torch.compile first (one layer
    compiled and reused by all: "regional compilation"), so elementwise work is fused;
  * the suffix prefill after a prefix hit, one graph per length bucket (padded up), from the
    suffix's token ids to its first token;
  * the vision tower + projector, one graph per pixel shape.
  * a one-row full-prompt prefill (a cold single request), one graph per prompt length rounded
    up to PREFILL_ROUND, padded after the prompt (causal attention keeps the padding out).
  Full-prompt prefill's layer is compiled with a dynamic length (flash attention, fused
  elementwise work) and q/k/v and gate/up run fused at every length (on the H200, llava-1.5-7b,
  628 tokens: 29.3 ms eager -> 15.3 ms; prefill_profile CSV); batches, prefixes prefilled alone
  and long suffixes run it uncaptured, the one-row prefill replays it captured.
  The static engine keeps long inputs on the original, separate projections, so its prefill is
  bit-identical to transformers'; the graph engine's is not (token_agree reports the effect).
  Anything that cannot be compiled runs uncompiled, and the row says so in `engine_detail`;
  anything that cannot be captured makes the row `skipped` with the reason.
- `graph-exact`: the graph engine doing transformers' arithmetic (`exact`), so its logits are
  bit-identical to the hf engine's and its greedy tokens too, near-ties and all (with random
  weights `graph` leaves hf's tokens at the first exact tie); the price is in GraphExactEngine.
"""
from __future__ import annotations

import weakref

import torch

from bench.engines import attention_kernels
from bench.engines import row_mean
from bench.engines.hf import HFEngine
from bench.errors import VariantUnsupported
from bench.engines.decoder import ExactLayers, KVBuffers, fast_decoder, inductor_options
from bench.engines.fused_linear import FUSED_MAX_ROWS
from bench.quant.int4 import Int4Linear, use_prefill_weights
from bench.quant.prefetch import DensePrefetch
from bench.measure.timing import Timeline

CACHE_ROUND = 256  # buffer length granularity; a longer request reallocates (and recaptures)
SUFFIX_BUCKETS = (16, 32, 64)  # suffix lengths (after a prefix hit) run as padded fixed-shape steps
# A suffix bucket attends over the buffers' columns up to its end rounded up to this, not over
# all of them: cuDNN attention of 32 queries costs 21.9 us per layer over 768 columns against
# 26.9 us over 1024 (results/h200/sdpa_backends_h200.csv), 0.16 ms of a 7B warm suffix.
KEY_ROUND = 128
PREFILL_ROWS = 4096  # a full-prompt prefill's length, for which linears it runs (fused or not)
# GraphEngine captures a full-prompt prefill per prompt length rounded up to this (padding after
# the prompt, which causal attention keeps out of it): a replay costs the host one launch instead
# of the compiled layers' ~500, so prefill time stops depending on host speed (on the H200 the
# uncaptured compiled prefill of llava-1.5-7b varied 16.5-20.6 ms between machines, CV 0.2, with
# 13.9 ms of kernels: results/h200/llava-1.5-7b-*-s15, prefill_profile_llava-1.5-7b.csv).
PREFILL_ROUND = 64


def _compiled(layer_fn) -> bool:
    """Whether a graph engine's layer function runs compiled code (None: the decoder's own, eager)."""
    owner = getattr(layer_fn, "__self__", None)
    return layer_fn is not None and (owner.compiled if isinstance(owner, ExactLayers) else True)


class StaticEngine(HFEngine):
    name = "static"
    fused_max_rows = FUSED_MAX_ROWS
    # Reproduce transformers' arithmetic (FastDecoder.set_exact): logits bit-identical to the hf
    # engine's, one request at a time; suffixes then run at their exact length (no buckets).
    exact = False

    def __init__(self, adapter, policy):
        super().__init__(adapter, policy)
        self.decoder = fast_decoder(adapter)
        self.decoder.set_fused_max_rows(self.fused_max_rows)
        self.decoder.set_exact(self.exact)
        # Uncompiled layer functions (None: the decoder's own layer_at / layer_from)
        exact_layers = ExactLayers(self.decoder) if self.exact else None
        self.eager_step_layer = exact_layers.at if exact_layers else None
        self.eager_prefill_layer = exact_layers.from_ if exact_layers else None
        self.cache: KVBuffers | None = None
        self.max_len = self.batch = 0
        self.one = torch.ones((), dtype=torch.long, device=adapter.device)
        # Which stored prefix each row of the working buffers still holds at its front (weak:
        # an evicted entry cannot match). Suffixes and decode write only behind the prefix, so
        # the next request on the same prefix finds it in place and copies nothing, as a paged
        # KV cache would reference its blocks; a prefill from column 0 forgets every row.
        self.resident: dict[int, weakref.ref] = {}
        self._staged: dict[int, tuple] = {}  # suffix ids per bucket: host, its numpy view, device
        self.prefetch = self._int4_prefetch()

    def _int4_prefetch(self) -> DensePrefetch | None:
        """Int4 weights: each layer's dense prefill weights dequantized a layer ahead (see
        bench.quant.prefetch); None for other weights."""
        if not getattr(self.adapter, "int4_prefetch", True):  # --no-int4-prefetch
            return None
        per_layer = [[m for m in ms if isinstance(m, Int4Linear)] for ms in self.decoder.prefill_linears(PREFILL_ROWS)]
        if not per_layer or not all(per_layer):
            return None
        try:
            return DensePrefetch(per_layer, self.adapter.dtype)
        except ValueError:  # layers of unequal shapes: each dequantizes in line
            return None

    def full_prefill(self, embeds: torch.Tensor, cache: KVBuffers, start: int, layer_fn=None, valid=None,
                     n_real=None):
        """The decoder's prefill, int4 weights read from the prefetched slots where there are some."""
        layer_fn = layer_fn or self.eager_prefill_layer
        if self.prefetch is None:
            return self.decoder.prefill(embeds, cache, start, layer_fn, valid, n_real=n_real)
        with use_prefill_weights():
            return self.decoder.prefill(embeds, cache, start, layer_fn, valid, self.prefetch, n_real)

    def _step_layer(self):
        """The layer function decode steps and suffixes run."""
        return self.eager_step_layer

    def prefetch_note(self) -> str:
        return ", int4 prefill weights dequantized a layer ahead" if self.prefetch is not None else ""

    def exact_note(self) -> str:
        if not self.exact:
            return ""
        found = [n for n in (self._step_layer().__self__.describe(), row_mean.describe()) if n]
        return ", transformers' arithmetic (its attention call over exactly the keys so far" + \
            "".join(f"; {n}" for n in found) + ")"

    def describe(self) -> str:
        return (f"own decoder ({self.decoder.fusion}), static KV, eager{self.exact_note()}{self.prefetch_note()}"
                f"{attention_kernels.note(self.adapter.device)}")

    def new_cache(self, prompt_tokens: int, max_new_tokens: int, batch: int = 1) -> KVBuffers:
        if self.exact and batch != 1:
            raise VariantUnsupported(f"the {self.name} engine runs one request at a time (it does not reproduce "
                                     f"transformers' padded-batch masks); this point batches {batch}")
        need = prompt_tokens + max_new_tokens + SUFFIX_BUCKETS[-1]  # room for a padded bucket
        if self.cache is None or need > self.max_len or batch != self.batch:
            self.max_len, self.batch = -(-need // CACHE_ROUND) * CACHE_ROUND, batch
            self._drop_buffers()
            self.cache = self.decoder.new_buffers(self.max_len, batch)
        else:
            self.cache.reset()
        return self.cache

    def scratch_cache(self, tokens: int) -> KVBuffers:
        """One-row buffers for a prefix prefilled alone (the working buffers hold the batch)."""
        return self.decoder.new_buffers(-(-tokens // CACHE_ROUND) * CACHE_ROUND, 1)

    def restore_prefixes(self, entries: list, cache: KVBuffers) -> list[int]:
        if cache is not self.cache:
            return cache.load_prefixes(entries)
        in_place = [self.holds(row, e) for row, e in enumerate(entries)]
        lengths = cache.load_prefixes(entries, in_place)  # one copy kernel per distinct prefix, none in place
        self.resident = {row: weakref.ref(e) for row, e in enumerate(entries)}
        return lengths

    def holds(self, row: int, entry) -> bool:
        """Whether row `row` of the working buffers still holds `entry` at its front."""
        ref = self.resident.get(row)
        return ref is not None and ref() is entry

    def save_prefix(self, cache: KVBuffers, row: int, n: int) -> tuple[object, int]:
        entry = cache.save_prefix(n, row)
        if cache is self.cache:
            self.resident[row] = weakref.ref(entry)  # a copy of exactly what the row holds
        return entry, entry.numel() * entry.element_size()

    def _drop_buffers(self) -> None:
        self.cache = None
        self.resident = {}

    def bucket(self, tokens: int) -> int | None:
        """The padded length a suffix of `tokens` runs at (exact: its own length), None if too long."""
        if self.exact:
            return tokens if tokens <= SUFFIX_BUCKETS[-1] else None
        return next((b for b in SUFFIX_BUCKETS if b >= tokens), None)

    def forget_overwritten(self, cache: KVBuffers, start: int) -> None:
        """A prefill from column 0 of the working buffers overwrites every row's front."""
        if start == 0 and cache is self.cache:
            self.resident = {}

    def key_len(self, start: int, bucket: int) -> int:
        """The columns a suffix bucket written at `start` attends over (see KEY_ROUND; exact:
        exactly the tokens so far, as transformers)."""
        if self.exact:
            return start + bucket
        return min(self.cache.max_len, -(-(start + bucket) // KEY_ROUND) * KEY_ROUND)

    def prefill(self, embeds: torch.Tensor, cache: KVBuffers, start: int, valid=None) -> torch.Tensor:
        """Embeddings at host-known columns (a warm single request's short suffix instead enters
        as token ids: `suffix_token`)."""
        self.forget_overwritten(cache, start)
        with attention_kernels.few_queries(embeds.shape[1]):
            return self.full_prefill(embeds, cache, start, valid=valid)

    def _lm_step(self, embeds, n_real, key_len: int | None = None):
        """decoder.step on the working buffers (GraphEngine: its compiled layer)."""
        return self.decoder.step(embeds, n_real, self.cache, self.eager_step_layer, key_len)

    # -------------------------------------------------------------- a warm request's suffix
    def _suffix_prefill(self, prepared: list, cache, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        """One request after a prefix hit in the working buffers: its suffix goes in as token
        ids (`suffix_token`); batches and long suffixes take the embeddings path."""
        if len(prepared) == 1 and cache is self.cache and cache.valid is None:
            ids = prepared[0].suffix_ids
            bucket = self.bucket(len(ids))
            if bucket is not None:
                return self.suffix_token(ids, lengths[0], bucket)
        return super()._suffix_prefill(prepared, cache, lengths)

    def _suffix_inputs(self, bucket: int) -> tuple:
        """(host staging, its numpy view, device input) for a bucket: [ids padded to `bucket`,
        real count, start column]. The host side is pinned on CUDA, so staging a request is one
        asynchronous copy (GraphEngine: a node of the suffix graph, not a call of its own)."""
        found = self._staged.get(bucket)
        if found is None:
            dev = self.adapter.device
            dev_in = torch.zeros(bucket + 2, dtype=torch.long, device=dev)
            host = torch.zeros(bucket + 2, dtype=torch.long, pin_memory=True) if dev.type == "cuda" else dev_in
            found = self._staged[bucket] = (host, host.numpy(), dev_in)
        return found

    def suffix_token(self, ids: list[int], start: int, bucket: int) -> tuple[torch.Tensor, list[int]]:
        """Greedy next token (device [1], host list) after the suffix `ids` written at `start`,
        the prefix in place before it: the ids, padded to `bucket`, their count and `start` go
        to the device in one copy, and the buffers' length, embedding, decoder step and argmax
        follow on the device (one graph replay on GraphEngine: a warm request's first token
        costs the host a replay and the read of the token, not a dozen launches)."""
        host, staged, dev_in = self._suffix_inputs(bucket)
        staged[:len(ids)] = ids
        staged[len(ids):bucket] = 0  # padding: written past the real tokens, never attended by them
        staged[bucket] = len(ids)
        staged[bucket + 1] = start
        self.cache.take_deferred()  # (== start when deferred): the call below writes the length
        token = self._suffix_token_call(host, dev_in, bucket, self.key_len(start, bucket))
        return token, token.tolist()  # the read waits for the copy: `host` is free again after it

    def _suffix_token_call(self, host: torch.Tensor, dev_in: torch.Tensor, bucket: int, key_len: int) -> torch.Tensor:
        if dev_in is not host:
            dev_in.copy_(host, non_blocking=True)
        self.cache.length.copy_(dev_in[bucket + 1])
        embeds = self.decoder.embed(dev_in[None, :bucket])
        return self._lm_step(embeds, dev_in[bucket], key_len)[:, -1].argmax(-1)

    def decode_step(self, token: torch.Tensor, cache) -> torch.Tensor:
        key_len = cache.get_seq_length() + 1 if self.exact else None  # exact: over exactly the keys so far
        with attention_kernels.few_queries(1):
            return self.decoder.step(self.decoder.embed(token[:, None]), self.one, cache, self.eager_step_layer,
                                     key_len)


class _Captured:
    """A CUDA graph and the static tensors it reads and writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple, output):
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphEngine(StaticEngine):
    name = "graph"
    fused_max_rows = 2**62  # fused at every length: faster compiled prefill (see the docstring)
    # How compiled layers round (bench.engines.decoder.NUMERICS). "eager-casts": in llava-1.5-7b's
    # decode step on the H200, 0.92% of a compiled layer's output elements differ from eager's
    # against 48% "fused", at the same step time (4.55 ms); "eager-exact" makes them identical for
    # 0.24 ms more per step (results/h200/compile_numerics_llava-1.5-7b-deterministic.csv,
    # agreement_numerics_llava-1.5-7b.csv). Identical layers alone do not give transformers'
    # tokens: its decode attends with flash over exactly the keys so far, which no single
    # captured graph can call (agreement_floor_llava-1.5-7b-deterministic.csv); GraphExactEngine
    # captures one graph per length instead.
    numerics = "eager-casts"

    prefill_round = PREFILL_ROUND
    requires_cuda = True  # (the CPU tests of graph-exact's bookkeeping stand in a fake capture)

    def __init__(self, adapter, policy):
        if self.requires_cuda and adapter.device.type != "cuda":
            raise VariantUnsupported(f"the {self.name} engine needs a CUDA device")
        super().__init__(adapter, policy)
        self.lm_graphs: dict[object, _Captured] = {}
        self._decode_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # batch -> (token, its embedding)
        self._decode_pool = self._new_decode_pool()
        self.vision_graphs: dict[tuple, _Captured] = {}
        self.notes: dict[str, str] = {}
        torch._dynamo.reset()  # compiled code of an earlier model is not reused (nor kept alive)
        self.decoder.numerics = self.numerics
        self.decoder.one_query_matmul = attention_kernels.deterministic()
        options = inductor_options(self.numerics)
        compile = lambda fn, dynamic: torch.compile(fn, dynamic=dynamic, options=options)  # noqa: E731
        exact_layers = ExactLayers(self.decoder, compile, self._projection_streams()) if self.exact else None
        self.layer_fn = exact_layers.at if exact_layers else compile(self.decoder.layer_at, False)
        self.prefill_fn = None
        first = self.decoder.layers[0]
        if "separate" not in (first.qkv.kind, first.gate_up.kind):  # dense or int4 (its dense path is one custom op)
            self.prefill_fn = exact_layers.from_ if exact_layers else compile(self.decoder.layer_from, True)
        else:  # bitsandbytes layers break a compiled graph at every call: slower than eager
            self.notes["prefill"] = "eager (these linears break a compiled graph at every call)"

    def _step_layer(self):
        return self.layer_fn or self.eager_step_layer

    def _projection_streams(self) -> list | None:
        """Side streams for exact layers' separate GEMMs (FusedProjections.forward); None: in turn."""
        return None

    def _new_decode_pool(self):
        """The memory pool decode graphs share (None: each its own; one graph per batch size)."""
        return None

    def describe(self) -> str:
        compiled = "compiled layers" if _compiled(self.layer_fn) else "uncompiled layers"
        prefill = "compiled prefill" if _compiled(self.prefill_fn) else "prefill " + self.notes.get("prefill", "eager")
        if self.prefill_fn is not None and "prefill graph" not in self.notes:
            prefill += (f" (one row from column 0: CUDA-graphed per {self.prefill_round}-token length bucket)"
                        if self.prefill_round > 1 else " (one row from column 0: CUDA-graphed per prompt length)")
        graphs = ("CUDA-graph decode (a graph per attended length) + suffixes (a graph per length and start)"
                  if self.exact else "CUDA-graph decode + suffix buckets")
        parts = [f"own decoder ({self.decoder.fusion}), static KV, {graphs} "
                 f"({compiled}, {self.numerics} numerics){self.exact_note()}, {prefill}{self.prefetch_note()}, "
                 f"vision {self.notes.get('vision', 'graphed')}{attention_kernels.note(self.adapter.device)}"]
        parts += [f"{k}: {v}" for k, v in self.notes.items() if k not in ("vision", "prefill")]  # incl. "prefill graph"
        return "; ".join(parts)

    def _drop_buffers(self) -> None:
        self.lm_graphs.clear()  # their captured addresses die with the old buffers
        self._decode_pool = self._new_decode_pool()  # and a shared pool's memory with them
        super()._drop_buffers()

    # ---------------------------------------------------------------------------------- capture
    def _capture(self, call, what: str, rewind: bool, warmups: int = 2, pool=None
                 ) -> tuple[torch.cuda.CUDAGraph, object]:
        """Warm `call` up on a side stream (compiles, allocator, lazy init), then capture it
        (into the memory pool `pool` if given, shared with graphs that never run concurrently)."""
        saved = self.cache.positions() if rewind else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                for _ in range(warmups):
                    call()
                    if rewind:  # warm-up steps wrote past the real tokens; nothing attends to those
                        self.cache.set_positions(saved)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = call()
        except Exception as e:  # never fall back to eager silently: the row is skipped with this
            raise VariantUnsupported(f"{what} cannot be captured in a CUDA graph: "
                                     f"{e.__class__.__name__}: {str(e)[:200]}") from e
        if rewind:
            self.cache.set_positions(saved)
        return graph, out

    def _lm_step(self, embeds, n_real, key_len: int | None = None):
        try:
            return self.decoder.step(embeds, n_real, self.cache, self.layer_fn, key_len)
        except Exception as e:  # noqa: BLE001 - compile failures have many types; recorded below
            if self.layer_fn is None or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            self.notes["compile"] = f"torch.compile failed ({e.__class__.__name__}: {str(e)[:120]}), layers run " \
                                    f"uncompiled"
            self.layer_fn = None
            return self.decoder.step(embeds, n_real, self.cache, self.eager_step_layer, key_len)

    def prefill(self, embeds: torch.Tensor, cache: KVBuffers, start: int, valid=None) -> torch.Tensor:
        self.forget_overwritten(cache, start)
        if (self.prefill_fn is not None and start == 0 and valid is None and cache is self.cache
                and cache.valid is None and "prefill graph" not in self.notes):
            padded = -(-embeds.shape[1] // self.prefill_round) * self.prefill_round
            if padded <= cache.max_len:
                try:
                    return self._prefill_graphed(embeds, padded)
                except VariantUnsupported as e:  # recorded in engine_detail; the compiled prefill runs
                    self.notes["prefill graph"] = f"not captured ({str(e)[:160]})"
        if self.prefill_fn is not None:
            try:
                return self.full_prefill(embeds, cache, start, self.prefill_fn, valid)
            except Exception as e:  # noqa: BLE001 - recorded in engine_detail, then eager
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                self.notes["prefill"] = f"eager (torch.compile failed: {e.__class__.__name__}: {str(e)[:120]})"
                self.prefill_fn = None
        return self.full_prefill(embeds, cache, start, valid=valid)

    def _prefill_graphed(self, embeds: torch.Tensor, padded: int) -> torch.Tensor:
        """A one-row prefill from column 0 as the replay of the compiled prefill captured at
        `padded` tokens (see PREFILL_ROUND); the logits are overwritten by the next replay."""
        key = ("prefill", padded)
        cap = self.lm_graphs.get(key)
        if cap is None:  # captured on zeros (finite padding), then replayed on this prompt below
            static = torch.zeros(1, padded, embeds.shape[-1], dtype=embeds.dtype, device=embeds.device)
            n_real = torch.full((), padded, dtype=torch.long, device=embeds.device)
            graph, out = self._capture(
                lambda: self.full_prefill(static, self.cache, 0, self.prefill_fn, n_real=n_real),
                f"prefill ({padded} tokens)", False)
            cap = self.lm_graphs[key] = _Captured(graph, (static, n_real), out)
        static, n_real = cap.inputs
        static[:, :embeds.shape[1]].copy_(embeds)  # the padding keeps stale finite embeddings
        n_real.fill_(embeds.shape[1])
        self.cache.take_deferred()  # the replay writes the length
        cap.graph.replay()
        return cap.output

    # ---------------------------------------------------------------------------------- vision
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        key = (tuple(pixel_values.shape), pixel_values.dtype)
        cap = self.vision_graphs.get(key)
        if cap is None:
            if "vision" in self.notes:  # capture failed before: recorded, eager
                return self.adapter.encode_image(pixel_values)
            static = pixel_values.clone()
            try:
                graph, out = self._capture(lambda: self.adapter.encode_image(static), "vision tower", False)
            except VariantUnsupported as e:
                self.notes["vision"] = f"eager ({str(e)[:160]})"
                return self.adapter.encode_image(pixel_values)
            cap = self.vision_graphs[key] = _Captured(graph, (static,), out)
        cap.inputs[0].copy_(pixel_values)
        cap.graph.replay()
        return cap.output.clone()  # the graph's output is overwritten by the next replay

    # ---------------------------------------------------------------------------------- LM
    def _suffix_token_call(self, host: torch.Tensor, dev_in: torch.Tensor, bucket: int, key_len: int) -> torch.Tensor:
        key = ("suffix ids", bucket, key_len)  # a graph per bucket and attended length
        cap = self.lm_graphs.get(key)
        if cap is None:  # the graph's first node copies the pinned staging buffer in
            call = super(GraphEngine, self)._suffix_token_call
            graph, out = self._capture(lambda: call(host, dev_in, bucket, key_len),
                                       f"suffix prefill ({bucket} tokens)", True)
            cap = self.lm_graphs[key] = _Captured(graph, (host, dev_in), out)
        cap.graph.replay()
        return cap.output  # overwritten by the next replay: decode copies it before any

    def _decode_call(self, token_buf, embeds_buf, key_len: int | None = None):
        logits = self._lm_step(embeds_buf, self.one, key_len)
        token_buf.copy_(logits[:, -1].argmax(-1))
        embeds_buf.copy_(self.decoder.embed(token_buf[:, None]))
        return logits

    def _decode_lengths(self, cache, steps: int) -> list[int | None]:
        """The keys each of `steps` decode steps attends over (a graph per distinct value); None:
        the whole buffers, one graph for every step."""
        return [None] * steps

    def _decode_graph(self, batch: int, key_len: int | None) -> _Captured:
        """The captured decode step over `key_len` keys; every one of a batch size reads and writes
        the same inputs (token, its embedding: `_set_decode_input`), so replays of different
        graphs chain."""
        key = ("decode", batch, key_len)
        cap = self.lm_graphs.get(key)
        if cap is None:
            tok, emb = self._decode_inputs[batch]
            saved = tok.clone(), emb.clone()  # warm-up steps advance them; the replay must not
            first = not any(k[:2] == ("decode", batch) for k in self.lm_graphs)  # compiles, lazy init
            what = f"decode step (batch {batch}" + (f", {key_len} keys)" if key_len else ")")
            graph, logits = self._capture(lambda: self._decode_call(tok, emb, key_len), what, True,
                                          warmups=2 if first else 1, pool=self._decode_pool)
            tok.copy_(saved[0])
            emb.copy_(saved[1])
            cap = self.lm_graphs[key] = _Captured(graph, (tok, emb), logits)
        return cap

    def _set_decode_input(self, token: torch.Tensor) -> torch.Tensor:
        """Feed `token` [B] to the decode graphs; returns the buffer their replays write the next
        token to."""
        inputs = self._decode_inputs.get(token.shape[0])
        if inputs is None:
            inputs = self._decode_inputs[token.shape[0]] = token.clone(), self.decoder.embed(token[:, None]).clone()
        tok, emb = inputs
        tok.copy_(token)
        emb.copy_(self.decoder.embed(token[:, None]))
        return tok

    def decode_step(self, token: torch.Tensor, cache) -> torch.Tensor:
        cache.settle()  # the replay advances the length on the device
        self._set_decode_input(token)  # the same replay decode runs, fed the given token
        cap = self._decode_graph(token.shape[0], self._decode_lengths(cache, 1)[0])
        cap.graph.replay()
        return cap.output

    def decode(self, token: torch.Tensor, cache, steps: int, tl: Timeline) -> list[torch.Tensor]:
        if steps == 0:
            return []
        cache.settle()  # the replays advance the length on the device
        tok = self._set_decode_input(token)
        out = []
        for key_len in self._decode_lengths(cache, steps):
            self._decode_graph(token.shape[0], key_len).graph.replay()
            out.append(tok.clone())
            tl.mark("decode")
        return out

class GraphExactEngine(GraphEngine):
    """The graph engine doing transformers' arithmetic (StaticEngine.exact), so that its greedy
    tokens are the hf engine's, ties and all, at graph speed less what exactness costs:
    - layers compiled with "eager-exact" numerics (bit-identical to eager), in parts between
      their GEMM groups and transformers' own attention call, which runs eagerly over exactly
      the keys so far (bench.engines.decoder.ExactLayers);
    - projections fused only where bit-equal to the separate GEMMs transformers runs; a step's
      separate ones side by side on two side streams (`concurrent_projections`);
    - one decode graph per attended length (the attention call's shape changes every token:
      flash attention's key blocks and split count follow it), all in one memory pool; a graph
      is captured the first time a length is reached (a warm-up request captures a request's);
    - suffixes after a cached prefix at their exact length (a graph per length and start), the
      full prompt captured per exact length (no padding), one request at a time.
    """
    name = "graph-exact"
    exact = True
    numerics = "eager-exact"
    prefill_round = 1
    # A step's separate q/k/v (gate/up) GEMMs run side by side (FusedProjections.forward): separately
    # they are narrower GEMVs that each read at a lower rate than the fused one they replace.
    concurrent_projections = True

    def _new_decode_pool(self):
        return torch.cuda.graph_pool_handle()  # a graph per attended length: their memory shared

    def _projection_streams(self) -> list | None:
        if not self.concurrent_projections or self.adapter.device.type != "cuda":
            return None
        return [torch.cuda.Stream(self.adapter.device) for _ in range(2)]  # the widest group has 3 GEMMs

    def exact_note(self) -> str:
        side = (", separate projections of a step side by side on 3 streams"
                if self.concurrent_projections and "separate" in self.decoder.fusion else "")
        return super().exact_note() + side

    def _decode_lengths(self, cache, steps: int) -> list[int | None]:
        # the one host read of the length: the first token is on the host already (nothing waits)
        first = cache.get_seq_length() + 1
        return list(range(first, first + steps))
