"""The `static` engine: KV buffers allocated once and reused by every request, driven by our
own decoder forward (bench.engines.decoder) in eager calls. Runs anywhere (the CPU tests check
its greedy tokens against transformers' generate); it makes the calls the `graph` engine
(bench.engines.graph) compiles and captures, with the same arithmetic (that engine's compiled step
layer adds each layer's MLP output in the next layer and writes keys and values by one copy, or
in its split-KV attention kernel).
It keeps long inputs on the original, separate projections, so its prefill is bit-identical to
transformers'.
"""
from __future__ import annotations

import weakref
from pathlib import Path

import torch

from bench.engines import attention_kernels
from bench.engines.decoder import FastDecoder, fast_decoder
from bench.engines.hf import HFEngine
from bench.engines.kv_buffers import KVBuffers
from bench.engines.spec import EngineSpec
from bench.quant.int4 import Int4Linear, int4_modules
from bench.quant.prefetch import DensePrefetch, drop_slots
from bench.quant.w4a16.choice import (DEFAULT, ROW_POINTS, KernelChoice, choose_kernels, reset_kernels,
                                      set_prefill_kernel)
from bench.quant.w4a16.registry import KERNELS


class StaticEngine(HFEngine):
    name = "static"
    default_spec = EngineSpec()
    replays_graphs = False  # its calls launch eagerly (measured int4 kernels are timed so)

    def __init__(self, adapter, policy, spec: EngineSpec | None = None):
        super().__init__(adapter, policy, spec)
        self.decoder = self._make_decoder()
        self.decoder.set_fused_max_rows(self.spec.fused_max_rows)
        # Uncompiled layer functions (None: the decoder's own layer_at / layer_from)
        self.eager_step_layer, self.eager_prefill_layer = self._eager_layers()
        self.cache: KVBuffers | None = None
        self.max_len = self.batch = 0
        self.one = torch.ones((), dtype=torch.long, device=adapter.device)
        # Which stored prefix each row of the working buffers still holds at its front (weak:
        # an evicted entry cannot match). Suffixes and decode write only behind the prefix, so
        # the next request on the same prefix finds it in place and copies nothing, as a paged
        # KV cache would reference its blocks; a prefill from column 0 forgets every row.
        self.resident: dict[int, weakref.ref] = {}
        self._staged: dict[tuple, tuple] = {}  # suffix ids per (bucket, rows): host, its numpy view, device
        self.prefetch = self._int4_prefetch()
        self.int4_kernels = self._choose_int4_kernels()
        # the int4 linears a prefill from column 0 tells it calls them (Int4Linear.prefilling):
        # those with a measured plan, the only ones the flag changes (each is a host write)
        self._prefill_int4 = [m for m in self._int4_layers() if m.row_plan is not None]

    def _reset_int4_layers(self) -> None:
        """Nothing here: the decoder's int4 kernels and prefetch are set once it is built
        (_choose_int4_kernels, _int4_prefetch)."""

    def _make_decoder(self) -> FastDecoder:
        """The decoder this engine drives (the model's FastDecoder; its blocks are shared by every
        engine over the model, which is why each sets their fusion when it is made)."""
        return fast_decoder(self.adapter)

    def _eager_layers(self) -> tuple:
        """(step, prefill) layer functions of eager calls; None: the decoder's own."""
        return None, None

    def _int4_layers(self) -> list:
        """Every int4 linear this engine's decoder runs or may run, the fused ones included."""
        return int4_modules(self.decoder)

    def _int4_prefetch(self) -> DensePrefetch | None:
        """Int4 weights: each layer's dense prefill weights dequantized a layer ahead (see
        bench.quant.prefetch), where the prefill runs the dense path; None otherwise. No linear
        keeps the slots an earlier engine over the model gave it."""
        drop_slots(self._int4_layers())
        if not self.spec.int4_prefetch or self._int4_prefill_kernel() != "dense":  # --no-int4-prefetch
            return None
        per_layer = [[m for m in ms if isinstance(m, Int4Linear)]
                     for ms in self.decoder.prefill_linears(self.spec.prefill_rows)]
        if not per_layer or not all(per_layer):
            return None
        try:
            return DensePrefetch(per_layer, self.adapter.dtype)
        except ValueError:  # layers of unequal shapes: each dequantizes in line
            return None

    def _choose_int4_kernels(self) -> KernelChoice | None:
        """Int4 weights: the kernel per row count of every int4 linear this engine's decoder
        holds (--int4-kernels; measured ones once per device and shape), whatever an earlier
        engine over the same model chose: those a call of at most max(ROW_POINTS[-1] or the
        spec's fused_max_rows if fewer, --int4-dense-rows) rows runs (fused or not) take the
        mode, measured at the ROW_POINTS up to fused_max_rows, the others the default; above
        those rows every call runs --int4-prefill-kernel (suffixes or batched steps of more rows),
        on whichever linears it runs, fused or not, and under a measured plan so does every call of
        a prefill from column 0 (full_prefill), at any rows. None for other weights."""
        layers = self._int4_layers()
        if not layers:
            return None
        mode, prefill, dtype = self._int4_kernel_mode(), self._int4_prefill_kernel(), self.adapter.dtype
        self._note_int4_kernels(mode, prefill)  # an engine that runs other kernels than asked says so
        if mode == DEFAULT and prefill == "dense":
            reset_kernels(layers, dtype)
            return KernelChoice(DEFAULT, layers)
        # the row counts the fused projections run (the separate ones above fused_max_rows are
        # transformers' own calls: they keep the default, as the hf engine runs them)
        points = tuple(p for p in ROW_POINTS if p <= self.spec.fused_max_rows)
        few = self._int4_linears_at(sorted({1, *points, *(m.dense_rows for m in layers)}))
        choose_kernels([m for m in layers if id(m) not in few], DEFAULT, dtype)
        cache = Path(self.spec.int4_kernel_cache).expanduser() if self.spec.int4_kernel_cache else None
        choice = choose_kernels(few.values(), mode, dtype, cache, points, allowed=self.spec.int4_kernel_candidates,
                                graph=self.replays_graphs)
        # the linears a call of more rows than their decode rows runs (only those hold the
        # kernel's own weight format): checked at one row past each bound and at a full prefill
        tops = sorted({m.decode_rows() + 1 for m in layers} | {self.spec.prefill_rows})
        above = {i: m for r in tops for i, m in self._int4_linears_at([r]).items() if m.decode_rows() < r}
        set_prefill_kernel([m for m in layers if id(m) not in above], "dense", dtype)
        set_prefill_kernel(above.values(), prefill, dtype)
        choice.prefill = prefill
        return choice

    def _int4_linears_at(self, rows) -> dict:
        """{id: layer} of the int4 linears calls of each of `rows` rows run (fused or not)."""
        return {id(m): m for r in rows for ms in self.decoder.prefill_linears(r) for m in ms
                if isinstance(m, Int4Linear)}

    def _int4_prefill_kernel(self) -> str:
        """--int4-prefill-kernel as this engine runs it."""
        return self.spec.int4_prefill_kernel

    def _int4_kernel_mode(self) -> str:
        """--int4-kernels as this engine runs it."""
        return self.spec.int4_kernels

    def full_prefill(self, embeds: torch.Tensor, cache: KVBuffers, start: int, layer_fn=None, valid=None,
                     n_real=None):
        """The decoder's prefill, int4 weights read from the prefetched slots where there are some."""
        layer_fn = layer_fn or self.eager_prefill_layer
        # a prompt's prefill from column 0 runs the prefill path at any rows; a suffix batch run
        # as a prefill (unequal lengths, or longer than a bucket) keeps the plan up to its top
        with Int4Linear.prefill_calls(self._prefill_int4 if start == 0 else ()):
            if self.prefetch is None:
                return self.decoder.prefill(embeds, cache, start, layer_fn, valid, n_real=n_real)
            with self.prefetch.reading():
                return self.decoder.prefill(embeds, cache, start, layer_fn, valid, self.prefetch, n_real)

    def _step_layer(self):
        """The layer function decode steps and suffixes run."""
        return self.eager_step_layer

    def memory_columns(self) -> dict:
        choice = self.int4_kernels
        return {"int4_prefetch_mb": self.prefetch.nbytes / 2**20 if self.prefetch is not None else None,
                "int4_kernels": choice.column() if choice is not None else None,
                "int4_prefill_kernel": self._int4_prefill_kernel() if choice is not None else None,
                "int4_kernel_mb": (sum(m.kernel_state_bytes() for m in self._int4_layers()) / 2**20
                                   if choice is not None else None)}

    def prefetch_note(self) -> str:
        return ", int4 prefill weights dequantized a layer ahead" if self.prefetch is not None else ""

    def arithmetic_note(self) -> str:
        """What this engine's arithmetic reproduces, for engine_detail ('' here: its own)."""
        return ""

    def describe(self) -> str:
        return (f"own decoder ({self.decoder.fusion}), static KV, eager{self.arithmetic_note()}{self.prefetch_note()}"
                f"{attention_kernels.note(self.adapter.device, self.spec.attention)}{self.pdl_note()}")

    def pdl_note(self) -> str:
        """", PDL ..." where kernels of this engine launch with programmatic dependent launch."""
        return ", PDL (programmatic dependent launch)" if self.pdl and self._launches_pdl() else ""

    def _launches_pdl(self) -> bool:
        """Whether a kernel this engine runs takes PDL where it is on: an int4 kernel that does
        (an eager engine launches no other; GraphEngine's compiled layers all do)."""
        return any(KERNELS[name].launches_pdl for m in self._int4_layers()
                   for name in ({m.kernel, m.prefill_kernel} | {n for _, n in m.row_plan or ()}) if name in KERNELS)

    def _check_batch(self, batch: int) -> None:
        """Raise VariantUnsupported for a batch size this engine does not run (any runs here)."""

    def new_cache(self, prompt_tokens: int, max_new_tokens: int, batch: int = 1) -> KVBuffers:
        self._check_batch(batch)
        need = prompt_tokens + max_new_tokens + self.spec.suffix_buckets[-1]  # room for a padded bucket
        if self.cache is None or need > self.max_len or batch != self.batch:
            cache_round = self.spec.cache_round
            self.max_len, self.batch = -(-need // cache_round) * cache_round, batch
            self._drop_buffers()
            self.cache = self.decoder.new_buffers(self.max_len, batch)
        else:
            self.cache.reset()
        return self.cache

    def scratch_cache(self, tokens: int) -> KVBuffers:
        """One-row buffers for a prefix prefilled alone (the working buffers hold the batch)."""
        return self.decoder.new_buffers(-(-tokens // self.spec.cache_round) * self.spec.cache_round, 1)

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
        """The padded length a suffix of `tokens` runs at, None if too long."""
        return next((b for b in self.spec.suffix_buckets if b >= tokens), None)

    def forget_overwritten(self, cache: KVBuffers, start: int) -> None:
        """A prefill from column 0 of the working buffers overwrites every row's front."""
        if start == 0 and cache is self.cache:
            self.resident = {}

    def key_len(self, start: int, bucket: int) -> int:
        """The columns a suffix bucket written at `start` attends over (the spec's key_round: see
        bench.engines.spec.KEY_ROUND)."""
        key_round = self.spec.key_round
        return min(self.cache.max_len, -(-(start + bucket) // key_round) * key_round)

    def prefill(self, embeds: torch.Tensor, cache: KVBuffers, start: int, valid=None) -> torch.Tensor:
        """Embeddings at host-known columns (a warm request's short suffix, or a batch's of one
        prefix length and one suffix length, instead enters as token ids: `suffix_token`)."""
        self.forget_overwritten(cache, start)
        with attention_kernels.few_queries(self.spec.attention, embeds.shape[1]):
            return self.full_prefill(embeds, cache, start, valid=valid)

    def _lm_step(self, embeds, n_real, key_len: int | None = None):
        """decoder.step on the working buffers (GraphEngine: its compiled layer)."""
        return self.decoder.step(embeds, n_real, self.cache, self.eager_step_layer, key_len)

    # -------------------------------------------------------------- a warm request's suffix
    def _suffix_prefill(self, prepared: list, cache, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Requests after a prefix hit in the working buffers: where every row's prefix has one
        length and every row's suffix another (one request; a batch asking one question about one
        image), the suffixes go in as token ids (`suffix_token`: one graph replay on GraphEngine);
        other batches and long suffixes take the embeddings path."""
        ids = [p.suffix_ids for p in prepared]
        if cache is self.cache and len(set(lengths)) == 1 and len({len(i) for i in ids}) == 1:
            bucket = self.bucket(len(ids[0]))
            if bucket is not None:
                return self.suffix_token(ids, lengths[0], bucket)
        return super()._suffix_prefill(prepared, cache, lengths)

    def _suffix_inputs(self, bucket: int, batch: int = 1) -> tuple:
        """(host staging, its numpy view, device input) for `batch` rows of a bucket: [each row's
        ids padded to `bucket`, row after row, real count, start column]. The host side is pinned
        on CUDA, so staging the rows is one asynchronous copy (GraphEngine: a node of the suffix
        graph, not a call of its own)."""
        found = self._staged.get((bucket, batch))
        if found is None:
            dev = self.adapter.device
            dev_in = torch.zeros(batch * bucket + 2, dtype=torch.long, device=dev)
            host = torch.zeros(batch * bucket + 2, dtype=torch.long, pin_memory=True) if dev.type == "cuda" else dev_in
            found = self._staged[(bucket, batch)] = (host, host.numpy(), dev_in)
        return found

    def suffix_token(self, ids: list[list[int]], start: int, bucket: int) -> tuple[torch.Tensor, list[int]]:
        """Greedy next token of each row (device [rows], host list) after its suffix `ids[row]`
        (all of one length) written at `start`, its prefix in place before it: the ids, each
        padded to `bucket`, their count and `start` go to the device in one copy, and the
        buffers' length, embedding, decoder step and argmax follow on the device (one graph
        replay on GraphEngine: a warm request's first token costs the host a replay and the read
        of the token, not a dozen launches)."""
        batch, n = len(ids), len(ids[0])
        host, staged, dev_in = self._suffix_inputs(bucket, batch)
        rows = staged[:batch * bucket].reshape(batch, bucket)
        rows[:, :n] = ids
        rows[:, n:] = 0  # padding: written past the real tokens, never attended by them
        staged[batch * bucket] = n
        staged[batch * bucket + 1] = start
        self.cache.take_deferred()  # (== start when deferred): the call below writes the length
        token = self._suffix_token_call(host, dev_in, bucket, self.key_len(start, bucket), batch)
        return token, token.tolist()  # the read waits for the copy: `host` is free again after it

    def _suffix_token_call(self, host: torch.Tensor, dev_in: torch.Tensor, bucket: int, key_len: int,
                           batch: int = 1) -> torch.Tensor:
        if dev_in is not host:
            dev_in.copy_(host, non_blocking=True)
        n = batch * bucket
        self.cache.length.copy_(dev_in[n + 1])
        embeds = self.decoder.embed(dev_in[:n].view(batch, bucket))
        return self._lm_step(embeds, dev_in[n], key_len)[:, -1].argmax(-1)

    def _decode_key_len(self, cache) -> int | None:
        """The keys an eager decode step attends over (None: the whole buffers)."""
        return None

    def decode_step(self, token: torch.Tensor, cache) -> torch.Tensor:
        key_len = self._decode_key_len(cache)
        with attention_kernels.few_queries(self.spec.attention, 1):
            return self.decoder.step(self.decoder.embed(token[:, None]), self.one, cache, self.eager_step_layer,
                                     key_len)
