"""The `graph` engine: the static engine's calls (bench.engines.static) captured in CUDA graphs
and replayed:
- the decode step (one token; embedding of the next token written back on the GPU, so replays
  chain without the host), with each decoder layer compiled by torch.compile first (one layer
  compiled and reused by all: "regional compilation"), so elementwise work is fused; one graph
  per batch size and attended length (the columns written so far rounded up to KEY_ROUND);
- the suffix prefill after a prefix hit, one graph per length bucket (padded up) and batch size,
  from the suffix's token ids to its first token (a batch's rows at once where they share one
  prefix length and one suffix length);
- the vision tower + projector, one graph per pixel shape.
- a one-row full-prompt prefill (a cold single request, or the prefix a cold batch on one image
  shares, prefilled once into a one-row buffer kept with the batch's), one graph per prompt
  length rounded up to the spec's prefill_round (PREFILL_ROUND), padded after the prompt (causal
  attention keeps the padding out);
- a whole batch's full-prompt prefill (a cold batch without a shared prefix), one graph per batch
  size and prompt width rounded up the same way (each row's gap after its prefix widened and
  masked), up to the spec's batch_prefill_tokens (batch x width), all in one memory pool.
Full-prompt prefill's layer is compiled with a dynamic length (flash attention, fused
elementwise work) and q/k/v and gate/up run fused at every length (on the H200, llava-1.5-7b,
628 tokens: 29.3 ms eager -> 15.3 ms; prefill_profile CSV); batches past batch_prefill_tokens and
long suffixes run it uncaptured, the prefills above replay it captured.
Unlike the static engine's, its prefill is not bit-identical to transformers' (token_agree
reports the effect); bench.engines.graph_exact's engine is.
Anything that cannot be compiled runs uncompiled, and the row says so in `engine_detail`;
anything that cannot be captured makes the row `skipped` with the reason.
"""
from __future__ import annotations

import torch

from bench.engines import attention_kernels
from bench.engines.decoder import deferring, folding, inductor_options
from bench.engines.kv_buffers import KVBuffers
from bench.engines.spec import EngineSpec
from bench.engines.static import StaticEngine
from bench.engines.token_feed import TokenFeed
from bench.errors import VariantUnsupported
from bench.measure.timing import Timeline
from bench.measure.compile_events import note_capture
from bench.measure.capture import capturing


class _Captured:
    """A CUDA graph and the static tensors it reads and writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple, output):
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphEngine(StaticEngine):
    name = "graph"
    # fused_max_rows: fused at every length, a faster compiled prefill (see the module docstring).
    # numerics: how compiled layers round (bench.engines.spec.NUMERICS). "eager-casts": in llava-1.5-7b's
    # decode step on the H200, 0.92% of a compiled layer's output elements differ from eager's
    # against 48% "fused", at the same step time (4.55 ms); "eager-exact" makes them identical for
    # 0.24 ms more per step (f67f436:results/h200/compile_numerics_llava-1.5-7b-deterministic.csv,
    # agreement_numerics_llava-1.5-7b.csv). Identical layers alone do not give transformers'
    # tokens: its decode attends with flash over exactly the keys so far, which no single
    # captured graph can call (agreement_floor_llava-1.5-7b-deterministic.csv); GraphExactEngine
    # captures one graph per length instead.
    default_spec = EngineSpec(numerics="eager-casts", fused_max_rows=2**62)
    requires_cuda = True  # (the CPU tests of graph-exact's bookkeeping stand in a fake capture)
    replays_graphs = True  # decode steps and suffix buckets replay CUDA graphs

    def __init__(self, adapter, policy, spec: EngineSpec | None = None):
        if self.requires_cuda and adapter.device.type != "cuda":
            raise VariantUnsupported(f"the {self.name} engine needs a CUDA device")
        super().__init__(adapter, policy, spec)
        self.lm_graphs: dict[object, _Captured] = {}
        self._decode_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # batch -> (token, its embedding)
        self._decode_pool = self._new_pool()
        self._batch_prefill_pool = self._new_pool()  # the batches' prefill graphs share one too
        self.vision_graphs: dict[tuple, _Captured] = {}
        self.notes: dict[str, str] = {}
        self._scratch: KVBuffers | None = None  # one row for a batch's shared prefix (scratch_cache)
        torch._dynamo.reset()  # compiled code of an earlier model is not reused (nor kept alive)
        # The step layer is compiled per shape (dynamic=False): one specialization per batch size's
        # decode and per suffix graph (bucket, attended length, batch size). Past dynamo's default
        # of 8 per function a new shape would run uncompiled, silently (the engine's bookkeeping
        # bounds how many there are: batch sizes x buckets x KEY_ROUND steps of the buffers).
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
        self.decoder.numerics = self.spec.numerics
        self.decoder.one_query_matmul = attention_kernels.deterministic(self.spec.attention)
        self.decoder.split_kv = self._split_kv()
        options = inductor_options(self.spec.numerics)
        compile = lambda fn, dynamic: torch.compile(fn, dynamic=dynamic, options=options)  # noqa: E731
        self.layer_fn = self._compiled_step_layer(compile)
        self.prefill_fn = None
        first = self.decoder.layers[0]
        if "separate" not in (first.qkv.kind, first.gate_up.kind):  # dense or int4 (its dense path is one custom op)
            self.prefill_fn = self._compiled_prefill_layer(compile)
        else:  # bitsandbytes layers break a compiled graph at every call: slower than eager
            self.notes["prefill"] = "eager (these linears break a compiled graph at every call)"

    def _split_kv(self) -> bool:
        """Whether compiled one-query steps attend by the split-KV kernels (the spec's
        decode_attention: "auto" where they can run this model and the attention kernels are
        deterministic, --attention-kernels auto leaving the steps to torch's SDPA choice);
        VariantUnsupported where "split-kv" is asked for and they cannot run."""
        asked = self.spec.decode_attention
        if asked == "matmul" or (asked == "auto" and not attention_kernels.deterministic(self.spec.attention)):
            return False
        from bench.engines import split_kv_attention  # registers vlmbench::split_kv_attention

        d = self.decoder
        why = split_kv_attention.unavailable(self.adapter.device, d.heads, d.kv_heads, d.head_dim)
        if why and asked == "split-kv":
            raise VariantUnsupported(why)
        return not why

    def _compiled_step_layer(self, compile):
        """The layer function decode steps and suffixes run, compiled by `compile(fn, dynamic)`:
        layer_at_deferred, whose MLP residual add goes into the next layer's first norm and whose
        keys and values are written by one copy, or where it attends by split-KV by its attention
        kernel (split_kv_attention.Config.write_kv) (compiled from layer_at, in llava-1.5-7b's captured
        int4 decode step on the H100 the add and the values' copy were kernels of their own, 32
        launches each of 1.2 and 1.1 us: results/lab/h100/decode_profile_llava-1.5-7b-rtn4-f16x2.csv)."""
        if self.spec.fold_norms:  # each RMSNorm with the add before it, in the GEMV's launch where it can
            return folding(compile(self.decoder.layer_at_folded, False))
        return deferring(compile(self.decoder.layer_at_deferred, False))

    def _compiled_prefill_layer(self, compile):
        """The layer function full prefills run, compiled (dynamic length)."""
        return compile(self.decoder.layer_from, True)

    def _step_layer(self):
        return self.layer_fn or self.eager_step_layer

    def _compiled(self, layer_fn) -> bool:
        """Whether a layer function runs compiled code (None: the decoder's own, eager)."""
        return layer_fn is not None

    def _graphs_note(self) -> str:
        """What this engine captures, for engine_detail."""
        return f"CUDA-graph decode (a graph per {self.spec.key_round} attended columns) + suffix buckets"

    def _new_pool(self):
        """A memory pool graphs that never replay at once share: the decode graphs' (a graph per
        batch size and attended length), the batches' prefill graphs' (None off CUDA)."""
        return torch.cuda.graph_pool_handle() if self.adapter.device.type == "cuda" else None

    def describe(self) -> str:
        compiled = "compiled layers" if self._compiled(self.layer_fn) else "uncompiled layers"
        prefill = ("compiled prefill" if self._compiled(self.prefill_fn)
                   else "prefill " + self.notes.get("prefill", "eager"))
        prefill_round = self.spec.prefill_round
        if self.prefill_fn is not None and "prefill graph" not in self.notes:
            prefill += (f" (one row from column 0: CUDA-graphed per {prefill_round}-token length bucket)"
                        if prefill_round > 1 else " (one row from column 0: CUDA-graphed per prompt length)")
        if self._batch_prefill_graphable(1, 1):
            prefill += (f", a batch's whole CUDA-graphed per batch size and {prefill_round}-token bucket up to "
                        f"{self.spec.batch_prefill_tokens} tokens")
        gate = " and SiLU(gate) * up with the gate/up projection" if self.decoder.fold_gate else ""
        folds = (f", each RMSNorm with the add before it{gate} (in triton-f16x2's launch where it runs)"
                 if getattr(self.layer_fn, "folds_norms", False) else "")
        parts = [f"own decoder ({self.decoder.fusion}), static KV, {self._graphs_note()} "
                 f"({compiled}, {self.spec.numerics} numerics"
                 f"{', split-kv decode attention' if self.decoder.split_kv else ''}"
                 f"{folds})"
                 f"{self.arithmetic_note()}, {prefill}"
                 f"{self.prefetch_note()}, "
                 f"vision {self.notes.get('vision', 'graphed')}"
                 f"{attention_kernels.note(self.adapter.device, self.spec.attention)}{self.pdl_note()}"]
        parts += [f"{k}: {v}" for k, v in self.notes.items() if k not in ("vision", "prefill")]  # incl. "prefill graph"
        return "; ".join(parts)

    def _launches_pdl(self) -> bool:
        return self._compiled(self.layer_fn) or super()._launches_pdl()

    def _drop_buffers(self) -> None:
        self.lm_graphs.clear()  # their captured addresses die with the old buffers
        self._decode_pool = self._new_pool()  # and a shared pool's memory with them
        self._batch_prefill_pool = self._new_pool()
        self._scratch = None
        super()._drop_buffers()

    def scratch_cache(self, tokens: int) -> KVBuffers:
        """One-row buffers for the prefix a cold batch shares, prefilled once: kept with the
        working buffers (and dropped with them), so that the prefix's prefill replays a graph
        captured on them, as a single request's does on the working buffers."""
        need = self._padded_prefill(tokens)  # the captured prefill's length fits
        if self._scratch is None or self._scratch.max_len < need:
            for key in [k for k in self.lm_graphs if k[0] == "scratch prefill"]:
                del self.lm_graphs[key]  # captured on the smaller buffers
            self._scratch = super().scratch_cache(need)
        else:
            self._scratch.reset()
        return self._scratch

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
            note_capture()
            with capturing(graph, pool=pool):
                out = call()
        except Exception as e:  # never fall back to eager silently: the row is skipped with this
            raise VariantUnsupported(f"{what} cannot be captured in a CUDA graph: "
                                     f"{e.__class__.__name__}: {str(e)[:200]}") from e
        if rewind:
            self.cache.set_positions(saved)
        return graph, out

    def step_call(self, embeds, n_real, key_len: int | None = None):
        """The decoder's step through this engine's step layer (lab profiles call it as the graphs do)."""
        return self.decoder.step(embeds, n_real, self.cache, self._step_layer(), key_len)

    def _lm_step(self, embeds, n_real, key_len: int | None = None):
        try:
            return self.step_call(embeds, n_real, key_len)
        except Exception as e:  # noqa: BLE001 - compile failures have many types; recorded below
            if self.layer_fn is None or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            self.notes["compile"] = f"torch.compile failed ({e.__class__.__name__}: {str(e)[:120]}), layers run " \
                                    f"uncompiled"
            self.layer_fn = None
            return self.step_call(embeds, n_real, key_len)

    def prefill(self, embeds: torch.Tensor, cache: KVBuffers, start: int, valid=None) -> torch.Tensor:
        self.forget_overwritten(cache, start)
        if start == 0 and self._batch_graph_at(cache, embeds.shape[1]):
            if valid is None:  # rows of one length: every column real
                valid = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            try:
                return self._batch_prefill_graphed(embeds, valid, cache)
            except VariantUnsupported as e:  # recorded in engine_detail; the compiled prefill runs
                self.notes["batch prefill graph"] = f"not captured ({str(e)[:160]})"
                cache.reset()  # a failed capture's warm-ups may have advanced the rows' positions
        if (self.prefill_fn is not None and start == 0 and valid is None
                and (cache is self.cache or cache is self._scratch)
                and cache.valid is None and "prefill graph" not in self.notes):
            padded = self._padded_prefill(embeds.shape[1])
            if padded <= cache.max_len:
                try:
                    return self._prefill_graphed(embeds, padded, cache)
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

    def _batch_prefill_graphable(self, batch: int, width: int) -> bool:
        """Whether a batch's full prefill `width` columns wide may replay a captured graph: the
        compiled prefill runs, no capture failed, and batch x width is within the spec's
        batch_prefill_tokens."""
        return (self.prefill_fn is not None and "batch prefill graph" not in self.notes
                and batch * width <= self.spec.batch_prefill_tokens)

    def _batch_graph_at(self, cache, width: int) -> bool:
        """Whether a full prefill `width` columns wide from column 0 of `cache` replays a batch
        prefill graph: the working buffers of a batch, a width at a prefill_round bucket (as
        batch_prompt_columns lays one out) and a graphable size."""
        return (cache is self.cache and cache.valid is not None and width == self._padded_prefill(width)
                and self._batch_prefill_graphable(cache.batch, width))

    def batch_prompt_columns(self, tokens: int, cache, max_new_tokens: int) -> int:
        """Where the batch's prefill is captured, its prompts are laid out at `tokens` rounded up
        to the spec's prefill_round (as a one-row prefill is padded), so that prompts of nearby
        lengths replay one graph; the wider gaps are masked like any row's."""
        padded = self._padded_prefill(tokens)
        if self._batch_graph_at(cache, padded) and padded + max_new_tokens <= cache.max_len:
            return padded
        return tokens

    def _batch_prefill_graphed(self, embeds: torch.Tensor, valid: torch.Tensor, cache: KVBuffers) -> torch.Tensor:
        """A batch's full prefill from column 0 of the working buffers as the replay of the
        compiled prefill captured at its shape (batch, columns), its rows' tokens and gaps
        (`valid`) the graph's inputs; the graphs share one memory pool, and the logits are
        overwritten by the next replay of any of them."""
        key = ("batch prefill", *embeds.shape[:2])
        cap = self.lm_graphs.get(key)
        if cap is None:  # captured on this batch (its warm-ups rewound), then replayed on it below
            static, static_valid = embeds.clone(), valid.clone()
            graph, out = self._capture(
                lambda: self.full_prefill(static, cache, 0, self.prefill_fn, static_valid),
                f"batch prefill ({embeds.shape[0]} x {embeds.shape[1]} tokens)", True,
                pool=self._batch_prefill_pool)
            cap = self.lm_graphs[key] = _Captured(graph, (static, static_valid), out)
        static, static_valid = cap.inputs
        static.copy_(embeds)
        static_valid.copy_(valid)
        cap.graph.replay()
        return cap.output

    def _padded_prefill(self, tokens: int) -> int:
        """The length a one-row prefill of `tokens` is captured at: up to the spec's prefill_round."""
        return -(-tokens // self.spec.prefill_round) * self.spec.prefill_round

    def _prefill_graphed(self, embeds: torch.Tensor, padded: int, cache: KVBuffers) -> torch.Tensor:
        """A one-row prefill from column 0 of `cache` (the working buffers or the scratch row) as
        the replay of the compiled prefill captured on it at `padded` tokens (a multiple of the
        spec's prefill_round); the logits are overwritten by the next replay."""
        key = ("prefill" if cache is self.cache else "scratch prefill", padded)
        cap = self.lm_graphs.get(key)
        if cap is None:  # captured on zeros (finite padding), then replayed on this prompt below
            static = torch.zeros(1, padded, embeds.shape[-1], dtype=embeds.dtype, device=embeds.device)
            n_real = torch.full((), padded, dtype=torch.long, device=embeds.device)
            graph, out = self._capture(
                lambda: self.full_prefill(static, cache, 0, self.prefill_fn, n_real=n_real),
                f"prefill ({padded} tokens)", False)
            cap = self.lm_graphs[key] = _Captured(graph, (static, n_real), out)
        static, n_real = cap.inputs
        static[:, :embeds.shape[1]].copy_(embeds)  # the padding keeps stale finite embeddings
        n_real.fill_(embeds.shape[1])
        cache.take_deferred()  # the replay writes the length
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
    def _suffix_token_call(self, host: torch.Tensor, dev_in: torch.Tensor, bucket: int, key_len: int,
                           batch: int = 1) -> torch.Tensor:
        key = ("suffix ids", bucket, key_len, batch)  # a graph per bucket, attended length and batch
        cap = self.lm_graphs.get(key)
        if cap is None:  # the graph's first node copies the pinned staging buffer in
            call = super(GraphEngine, self)._suffix_token_call
            graph, out = self._capture(lambda: call(host, dev_in, bucket, key_len, batch),
                                       f"suffix prefill ({bucket} tokens" + (f", batch {batch})" if batch > 1 else ")"),
                                       True)
            cap = self.lm_graphs[key] = _Captured(graph, (host, dev_in), out)
        cap.graph.replay()
        return cap.output  # overwritten by the next replay: decode copies it before any

    def _decode_call(self, token_buf, embeds_buf, key_len: int | None = None):
        logits = self._lm_step(embeds_buf, self.one, key_len)
        token_buf.copy_(logits[:, -1].argmax(-1))
        embeds_buf.copy_(self.decoder.embed(token_buf[:, None]))
        return logits

    def _decode_lengths(self, cache, steps: int) -> list[int | None]:
        """The keys each of `steps` decode steps attends over (a graph per distinct value): the
        columns written by then, rounded up as a suffix's are (`key_len`: the spec's key_round;
        graph-exact's, exactly), so that a step's attention reads those columns of the buffers,
        not all max_len of them: at batch 16 a 7B's keys and values over 1024 columns are 8 GiB
        a step. ValueError where the steps would pass the buffers' last column."""
        # the one host read of the length: the first token is on the host already (nothing waits)
        start = cache.get_seq_length()
        if start + steps > cache.max_len:  # (split-KV attention writing keys would drop one past the buffers)
            raise ValueError(f"{steps} decode steps from column {start} do not fit the {cache.max_len}-column "
                             "KV buffers")
        return [self.key_len(start + i, 1) for i in range(steps)]

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
        feed = TokenFeed(self.token_hook)
        for key_len in self._decode_lengths(cache, steps):
            self._decode_graph(token.shape[0], key_len).graph.replay()
            out.append(tok.clone())
            tl.mark("decode")
            feed.push(out[-1])
        feed.flush()
        return out
