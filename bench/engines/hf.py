"""The `hf` engine: transformers' eager forward with a DynamicCache, greedy, fixed length.

It is the loop `generate` runs for greedy search, written out so each phase is timed:
tokenize (CPU) -> prefix lookup -> restore -> [miss: image processor (CPU) -> vision] ->
prefill (first token on host) -> [miss: cache store] -> one timed step per further token.
EOS is ignored: every request decodes exactly `max_new_tokens` tokens, so runs are comparable.

A batch of requests runs as one: every row is laid out prefix | gap | suffix so all rows end at
the last column (the gap is masked out of attention and skipped by the positions), which keeps
each row's prefix at positions 0.. where the prefix cache stores and restores it. A batch of
one has no gap and no mask: exactly the single-request path.
"""
from __future__ import annotations

import time
import weakref

import torch
from transformers import DynamicCache

from bench import pdl
from bench.engines import attention_kernels
from bench.engines.cache_policy import CachePolicy
from bench.engines.decoder import built_decoder
from bench.engines.spec import EngineSpec
from bench.engines.token_feed import TokenFeed
from bench.log import status
from bench.models.base import VLMAdapter
from bench.measure.request import RequestResult
from bench.measure.timing import Timeline, sum_by_label
from bench.models.visual import as_visual
from bench.quant.int4 import int4_modules
from bench.quant.prefetch import drop_slots
from bench.quant.w4a16.choice import plans_column, reset_kernels
from bench.quant.w4a16.registry import DEFAULT_KERNEL


def layout_rows(rows: list[torch.Tensor], prefix_lens: list[int], length: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack [1, n_b, H] rows as prefix | gap | rest, every row ending at the last column, at
    `length` columns (default: the longest row's). Returns (embeds [B, T, H], valid [B, T] bool,
    None when no row has a gap). One row is returned as it is."""
    if len(rows) == 1:
        return rows[0], None
    t = max(r.shape[1] for r in rows)
    if length is not None:
        if length < t:
            raise ValueError(f"a {t}-token row does not fit a layout of {length} columns")
        t = length
    out = rows[0].new_zeros(len(rows), t, rows[0].shape[-1])
    valid = torch.zeros(len(rows), t, dtype=torch.bool, device=rows[0].device)
    for b, (r, p) in enumerate(zip(rows, prefix_lens)):
        gap = t - r.shape[1]
        out[b, :p], out[b, p + gap:] = r[0, :p], r[0, p:]
        valid[b, :p] = valid[b, p + gap:] = True
    return out, (None if bool(valid.all()) else valid)


class HFCache:
    """A DynamicCache plus, for padded batches, the attention mask so far and each row's next
    position (None for an unpadded batch: transformers' own positions and causal mask)."""

    def __init__(self):
        self.kv = DynamicCache()
        self.valid: torch.Tensor | None = None  # [B, tokens in kv] bool
        self.next_pos: torch.Tensor | None = None  # [B]

    def extend(self, new_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask over cache + new tokens, positions of the new tokens) and record them."""
        if self.next_pos is None:
            self.next_pos = torch.zeros(new_valid.shape[0], dtype=torch.long, device=new_valid.device)
        mask = new_valid if self.valid is None else torch.cat([self.valid, new_valid], dim=1)
        pos = (self.next_pos[:, None] + new_valid.long().cumsum(1) - 1).clamp_min(0)
        self.valid, self.next_pos = mask, self.next_pos + new_valid.sum(1)
        return mask.long(), pos


# Warnings already given, per loaded model (every engine made over it would repeat them)
_SAID: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class HFEngine:
    name = "hf"
    default_spec = EngineSpec()  # reads `attention` only
    # Called with every row's token ids (list[int]) as each position is generated: the first after
    # prefill, then after every decode step, as soon as the step is done (bench.engines.token_feed;
    # a server streams them). None: no per-token host sync.
    token_hook = None

    def __init__(self, adapter: VLMAdapter, policy: CachePolicy, spec: EngineSpec | None = None):
        self.adapter, self.policy = adapter, policy
        self.spec = self.default_spec if spec is None else spec
        # PDL for what this engine compiles and launches (bench.pdl): set for the process when an
        # engine is made, so that an earlier engine's setting never carries over. Launches read the
        # process's switch, so engines alive together must share it (a run's --pdl is run-wide).
        self.pdl = pdl.configure(self.spec.pdl, adapter.device)
        self._reset_int4_layers()

    def _reset_int4_layers(self) -> None:
        """transformers' modules run int4 weights on the default kernels (and a static engine's
        fused projections, which this engine never runs, drop the weight formats that engine's
        kernels kept, and an earlier engine's prefetch slots: nothing reads them). StaticEngine
        sets its own."""
        dec = built_decoder(self.adapter)
        every = [*self._int4_layers(), *(int4_modules(dec) if dec is not None else [])]
        reset_kernels(every, self.adapter.dtype)
        drop_slots(every)
        if self._int4_layers():
            self._note_int4_kernels(DEFAULT_KERNEL, "dense")

    def _note_int4_kernels(self, kernels: str, prefill: str) -> None:
        """A one-line warning when this engine runs int4 weights on other kernels than
        --int4-kernels / --int4-prefill-kernel ask for (the int4_kernels column says what ran)."""
        asked = [f"{flag} {want}" for flag, want, runs in (("--int4-kernels", self.spec.int4_kernels, kernels),
                                                         ("--int4-prefill-kernel", self.spec.int4_prefill_kernel,
                                                          prefill)) if want != runs]
        if not asked:
            return
        message = (f"warning: the {self.name} engine runs int4 weights on {kernels} (prefill: {prefill}); "
                   f"{' and '.join(asked)} {'apply' if len(asked) > 1 else 'applies'} to the static and graph engines")
        said = _SAID.setdefault(self.adapter.model, set())
        if message not in said:  # once per model: a run makes its engine again (fidelity probe, a failed point)
            said.add(message)
            status(message)

    def _int4_layers(self) -> list:
        return int4_modules(self.adapter.model)

    def new_cache(self, prompt_tokens: int, max_new_tokens: int, batch: int = 1):
        """The request's working KV cache (a fresh DynamicCache; StaticEngine reuses one buffer)."""
        return HFCache()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector on device pixels (GraphEngine replays a captured graph)."""
        return self.adapter.encode_image(pixel_values)

    def prefill(self, embeds: torch.Tensor, cache: HFCache, start: int, valid: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Forward `embeds` placed after the `start` tokens already in `cache` (`valid`: which
        of the new tokens are real, for a padded batch); last position's logits."""
        with attention_kernels.few_queries(self.spec.attention, embeds.shape[1]):
            if valid is None and cache.valid is None:
                return self.adapter.lm_forward(embeds, cache.kv)
            if valid is None:
                valid = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            mask, pos = cache.extend(valid)
            return self.adapter.lm_forward(embeds, cache.kv, attention_mask=mask, position_ids=pos)

    def restore_prefixes(self, entries: list, cache: HFCache) -> list[int]:
        """Copy each row's stored prefix into the empty working cache (rows of unequal length
        end in a masked gap); returns the prefix lengths. The stored tensors are not written."""
        lengths = [e[0][0].shape[-2] for e in entries]
        if len(entries) == 1:
            for layer, (k, v) in enumerate(entries[0]):
                cache.kv.update(k, v, layer)
            return lengths
        n = max(lengths)
        for layer in range(len(entries[0])):
            k0 = entries[0][layer][0]
            k = k0.new_zeros(len(entries), *k0.shape[1:-2], n, k0.shape[-1])
            v = torch.zeros_like(k)
            for b, e in enumerate(entries):
                k[b, ..., :lengths[b], :], v[b, ..., :lengths[b], :] = e[layer][0][0], e[layer][1][0]
            cache.kv.update(k, v, layer)
        dev = k0.device
        cache.valid = torch.arange(n, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]
        cache.next_pos = torch.tensor(lengths, device=dev)
        return lengths

    def save_prefix(self, cache: HFCache, row: int, n: int) -> tuple[object, int]:
        """(row's first n positions of every layer, bytes): what the prefix cache stores."""
        entry = [(layer.keys[row:row + 1, ..., :n, :].clone(), layer.values[row:row + 1, ..., :n, :].clone())
                 for layer in cache.kv.layers]
        return entry, sum(t.numel() * t.element_size() for kv in entry for t in kv)

    def memory_columns(self) -> dict:
        """Device memory this engine holds beside the weights and the KV cache, and the int4
        kernels it runs, as row columns (definitions in bench.measure.schema)."""
        layers = self._int4_layers()
        return {"int4_kernels": plans_column(layers), "int4_prefill_kernel": "dense" if layers else None}

    def describe(self) -> str:
        """How this engine runs (the engine_detail column)."""
        return f"transformers forward, DynamicCache{attention_kernels.note(self.adapter.device, self.spec.attention)}"

    def decode_step(self, token: torch.Tensor, cache: HFCache) -> torch.Tensor:
        """One decode step on `token` [B] (greedy decode and teacher forcing); logits [B, 1, vocab]."""
        embeds = self.adapter.input_embeddings()(token[:, None])
        with attention_kernels.few_queries(self.spec.attention, 1):
            if cache.valid is None:
                return self.adapter.lm_forward(embeds, cache.kv)
            mask, pos = cache.extend(torch.ones_like(token, dtype=torch.bool)[:, None])
            return self.adapter.lm_forward(embeds, cache.kv, attention_mask=mask, position_ids=pos)

    @torch.inference_mode()
    def teacher_forced_logprobs(self, visual, question: str, continuation: list[int]) -> torch.Tensor:
        """Log-probabilities of each position of `continuation`, computed the way this engine
        serves a request: its prefill, then one of its decode steps per token. [len, vocab] on CPU."""
        a = self.adapter
        prepared = a.prepare(visual, question)
        cache = self.new_cache(prepared.prompt_tokens, len(continuation))
        image_embeds = self.encode_image(a.pixels_to_device(prepared))
        # copies: a graph engine's outputs are its graphs' buffers, overwritten by later replays
        rows = [self.prefill(a.prompt_embeds(prepared, image_embeds), cache, 0)[:, -1].to(torch.float32, copy=True)]
        for tok in continuation[:-1]:
            rows.append(self.decode_step(torch.tensor([tok], device=a.device), cache)[:, -1]
                        .to(torch.float32, copy=True))
        return torch.log_softmax(torch.cat(rows), dim=-1).cpu()

    def decode(self, token: torch.Tensor, cache, steps: int, tl: Timeline) -> list[torch.Tensor]:
        """`steps` greedy steps after `token` [B], one timeline mark each; token ids stay on device."""
        out = []
        feed = TokenFeed(self.token_hook)
        for _ in range(steps):
            token = self.decode_step(token, cache)[:, -1].argmax(-1)
            out.append(token)
            tl.mark("decode")
            feed.push(token)
        feed.flush()
        return out

    def _first_token(self, first: list[int], store=None) -> None:
        """Every row's first token to the per-token hook, as soon as it is on the host; then
        `store()` (the prefix cache's store: store_ms is not part of TTFT), also when the hook
        stops the batch (a server's clients all gone): the prefix is prefilled by then, and a
        later request on it finds it stored."""
        try:
            if self.token_hook is not None:
                self.token_hook(first)
        finally:
            if store is not None:
                store()

    def _encode_rows(self, prepared: list, rows: list[int]) -> list[torch.Tensor]:
        """Vision tower once over the pixels of `rows`; each row's embeddings [1, n, H]."""
        a = self.adapter
        pixels = torch.cat([prepared[i].pixel_values for i in rows]) if len(rows) > 1 else prepared[rows[0]].pixel_values
        embeds = self.encode_image(pixels.to(a.device, dtype=a.dtype, non_blocking=True))
        sizes = [prepared[i].total_image_tokens for i in rows]
        return list(embeds.split(sizes, dim=1))

    def prefill_prefix(self, embeds: torch.Tensor, n: int) -> tuple[object, int]:
        """Prefill one prefix alone (in a scratch cache of one row); (entry, bytes) as save_prefix."""
        cache = self.scratch_cache(embeds.shape[1])
        self.prefill(embeds, cache, 0)
        return self.save_prefix(cache, 0, n)

    def scratch_cache(self, tokens: int):
        return HFCache()

    def batch_prompt_columns(self, tokens: int, cache, max_new_tokens: int) -> int:
        """The columns a batch's full prompts of at most `tokens` tokens are laid out at (the rest
        a masked gap after each row's prefix): `tokens` here; an engine that captures a batch's
        prefill per length bucket pads up to its bucket."""
        return tokens

    def _suffix_prefill(self, prepared: list, cache, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Every row's suffix after its restored prefix; (next token ids on device, on host)."""
        embeds, valid = layout_rows([self.adapter.embed_ids(p.suffix_ids) for p in prepared], [0] * len(prepared))
        token = self.prefill(embeds, cache, max(lengths), valid)[:, -1].argmax(-1)
        return token, token.tolist()

    def run(self, visual, question: str, max_new_tokens: int) -> RequestResult:
        """One request: `visual` is a VisualInput, one PIL image or a list of them."""
        return self.run_batch([(visual, question)], max_new_tokens)

    @torch.inference_mode()
    def run_batch(self, requests: list[tuple[object, str]], max_new_tokens: int,
                  prepared: list | None = None) -> RequestResult:
        """Requests (visual, question) run as one batch; phases are the batch's. `prepared`: each
        request's adapter.prepare_text result where the caller made it already (the server does,
        to check that the request fits), so the prompt is not tokenized twice."""
        a, policy = self.adapter, self.policy
        tl = Timeline(a.device)
        t0 = time.perf_counter()
        tl.mark("start", host_only=True)
        visuals = [as_visual(v) for v, _ in requests]
        if prepared is None:
            prepared = [a.prepare_text(q, v) for v, (_, q) in zip(visuals, requests)]
        tl.mark("preprocess", host_only=True)

        lookups = [policy.lookup_prefix(a, p, v) for p, v in zip(prepared, visuals)]
        tl.mark("lookup")
        # columns a padded batch may use: prefixes and suffixes each padded to the longest
        columns = max(p.prefix_tokens for p in prepared) + max(len(p.suffix_ids) for p in prepared)
        cache = self.new_cache(columns, max_new_tokens, len(requests))
        hit = all(lk is not None and lk.entry is not None for lk in lookups)
        lengths = self.restore_prefixes([lk.entry for lk in lookups], cache) if hit else None
        tl.mark("restore")
        embeds_hit = False
        shared_miss = all(lk is not None and lk.entry is None for lk in lookups) \
            and len({lk.key for lk in lookups}) == 1
        if len(requests) > 1 and shared_miss:
            # Every row misses on the same prefix (one image, several questions): prefill it once,
            # restore it into every row, as a later warm batch would, and store it once the first
            # tokens are out (store_ms is not part of TTFT).
            p0 = prepared[0]
            p0.pixel_values = a.pixels_for(visuals[0])
            tl.mark("preprocess", host_only=True)
            image_embeds, embeds_hit = policy.image_embeds(a, [p0], lambda rows: self._encode_rows([p0], rows))
            tl.mark("vision")
            entry, nbytes = self.prefill_prefix(a.prefix_embeds(p0, image_embeds[0]), p0.prefix_tokens)
            tl.mark("prefill")
            lengths = self.restore_prefixes([entry] * len(requests), cache)
            tl.mark("restore")
            token, first = self._suffix_prefill(prepared, cache, lengths)
            tl.mark("prefill")
            self._first_token(first, lambda: policy.store_prefix(lookups[0], entry, nbytes))
            tl.mark("store")
            cached = 0
        elif not hit:
            for p, v in zip(prepared, visuals):
                p.pixel_values = a.pixels_for(v)
            tl.mark("preprocess", host_only=True)
            image_embeds, embeds_hit = policy.image_embeds(a, prepared, lambda rows: self._encode_rows(prepared, rows))
            tl.mark("vision")
            prompts = [a.prompt_embeds(p, e) for p, e in zip(prepared, image_embeds)]
            width = self.batch_prompt_columns(max(e.shape[1] for e in prompts), cache, max_new_tokens)
            embeds, valid = layout_rows(prompts, [p.prefix_tokens for p in prepared], width)
            logits = self.prefill(embeds, cache, 0, valid)
            token = logits[:, -1].argmax(-1)
            first = token.tolist()
            tl.mark("prefill")

            def store():
                stored = set()
                for row, (p, lk) in enumerate(zip(prepared, lookups)):
                    if lk is not None and lk.entry is None and lk.key not in stored:
                        policy.store_prefix(lk, *self.save_prefix(cache, row, p.prefix_tokens))
                        stored.add(lk.key)

            self._first_token(first, store)
            tl.mark("store")
            cached = 0
        else:
            token, first = self._suffix_prefill(prepared, cache, lengths)
            tl.mark("prefill")
            self._first_token(first)
            cached = lengths[0]

        generated = self.decode(token, cache, max_new_tokens - 1, tl)
        rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in first]
        batch_tokens = [[f] + r for f, r in zip(first, rows)]
        e2e_ms = (time.perf_counter() - t0) * 1e3

        phases = tl.phases_ms()
        return RequestResult(
            tokens=batch_tokens[0],
            phases_ms=sum_by_label(phases),
            step_ms=[ms for label, ms in phases if label == "decode"],
            e2e_ms=e2e_ms,
            prompt_tokens=max(p.prompt_tokens for p in prepared),
            prefix_tokens=prepared[0].prefix_tokens,
            cached_tokens=cached,
            cache_hit=hit or embeds_hit,
            batch_size=len(requests),
            batch_tokens=batch_tokens,
            extra={"engine_detail": self.describe()},
            cpu_phases_ms=None if tl.cuda else sum_by_label(tl.cpu_phases_ms()),
        )
