"""The static engines' own decoder: fused projections are exact and share memory, the padded
suffix step and the offset prefill agree with transformers, prefix restore is one copy."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.engines.cache_policy import CachePolicy
from bench.engines.decoder import FastDecoder, deferring, fast_decoder, folding, inductor_options
from bench.engines.fused_linear import FusedProjections
from bench.models.loader import load_checkpoint
from bench.engines.kv_buffers import KVBuffers
from bench.engines.spec import SUFFIX_BUCKETS
from bench.engines.static import StaticEngine
from tests.test_engine import reference_generate
from variants.prefix import PrefixKVPolicy

CPU = torch.device("cpu")


def test_fused_dense_projections_are_exact_and_share_the_weights():
    torch.manual_seed(0)
    linears = [nn.Linear(64, n, bias=True) for n in (64, 16, 16)]
    x = torch.randn(3, 5, 64)
    want = [m(x) for m in linears]
    fused = FusedProjections(linears)
    assert fused.kind == "dense"
    for got, w in zip(fused(x), want):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)
    # the originals now read the fused tensor: no second copy of the weights
    base = fused.fused.weight.untyped_storage().data_ptr()
    assert all(m.weight.untyped_storage().data_ptr() == base for m in linears)
    for m, w in zip(linears, want):  # and still compute what they did
        torch.testing.assert_close(m(x), w)


def test_fused_int4_projections_equal_the_separate_kernels():
    pytest.importorskip("torchao")
    from bench.quant.int4 import Int4Linear, quantize_int4

    torch.manual_seed(0)
    parts = [Int4Linear.from_int4(quantize_int4(torch.randn(n, 256), 64), CPU, torch.float32) for n in (128, 32, 64)]
    x = torch.randn(1, 3, 256)
    want = [m(x) for m in parts]
    fused = FusedProjections(parts)
    assert fused.kind == "int4" and fused.fused.out_features == 224
    for got, w in zip(fused(x), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


def test_unfusable_kinds_run_separately():
    class Odd(nn.Linear):  # e.g. a bitsandbytes layer: subclasses nn.Linear, own weight format
        pass

    linears = [Odd(8, 8), nn.Linear(8, 8)]
    fused = FusedProjections(linears)
    x = torch.randn(2, 8)
    assert fused.kind == "separate"
    assert all(torch.equal(a, m(x)) for a, m in zip(fused(x), linears))


def test_separate_projections_on_side_streams_fork_before_the_first_gemm(monkeypatch):
    """Side by side means three wide: every side stream is forked from the current one before any
    GEMM is queued (forked after the first, they would wait for it), each module runs on its own
    stream, and the current stream joins them all before the outputs are used. Streams and
    modules are stand-ins that record the order (no CUDA here)."""
    from contextlib import contextmanager

    events, active = [], ["current"]

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(("wait", self.name, other.name))

    @contextmanager
    def on(stream):
        active.append(stream.name)
        yield
        active.pop()

    class Recorder(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i = i

        def forward(self, x):
            events.append(("gemm", self.i, active[-1]))
            return self.i

    class CudaInput:  # what forward reads of an input: its rows and that it lives on a GPU
        shape, is_cuda = (1, 8), True

        def numel(self):
            return 8

    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream("current"))
    monkeypatch.setattr(torch.cuda, "stream", on)
    proj = FusedProjections([nn.Linear(8, 8, bias=False) for _ in range(3)], max_rows=0)  # never fused
    proj.parts = nn.ModuleList(Recorder(i) for i in range(3))
    assert proj(CudaInput(), [Stream("s1"), Stream("s2")]) == (0, 1, 2)
    assert events == [("wait", "s1", "current"), ("wait", "s2", "current"),
                      ("gemm", 0, "current"), ("gemm", 1, "s1"), ("gemm", 2, "s2"),
                      ("wait", "current", "s1"), ("wait", "current", "s2")]


def test_kv_buffers_save_and_restore_a_prefix_as_one_tensor():
    kv = KVBuffers(layers=3, kv_heads=2, head_dim=4, max_len=16, device=CPU, dtype=torch.float32)
    kv.data.normal_()
    entry = kv.save_prefix(5)
    assert entry.shape == (3, 2, 1, 2, 5, 4)
    want = [(layer.keys[:, :, :5].clone(), layer.values[:, :, :5].clone()) for layer in kv.layers]
    kv.data.zero_()
    assert kv.load_prefixes([entry]) == [5] and kv.get_seq_length() == 5
    for layer, (k, v) in zip(kv.layers, want):
        assert torch.equal(layer.keys[:, :, :5], k) and torch.equal(layer.values[:, :, :5], v)
    assert not kv.data[..., 5:, :].any()


def test_kv_length_deferred_by_reset_and_an_in_place_prefix_is_settled_before_use(monkeypatch):
    """A warm request's reset and in-place prefix write nothing to the device; whatever reads
    or advances the length first writes it (and a suffix call takes it with its inputs)."""
    kv = KVBuffers(layers=1, kv_heads=1, head_dim=4, max_len=16, device=CPU, dtype=torch.float32)
    kv.length.fill_(11)  # a previous request's end
    writes = []
    for name in ("fill_", "zero_", "copy_"):
        monkeypatch.setattr(type(kv.length), name, lambda t, *a, _f=getattr(torch.Tensor, name), _n=name:
                            writes.append(_n) or _f(t, *a))
    kv.reset()
    entry = torch.zeros(1, 2, 1, 1, 7, 4)
    assert kv.load_prefixes([entry], in_place=[True]) == [7]
    assert writes == [] and kv.get_seq_length() == 7 and int(kv.length) == 11
    assert kv.positions()[0].item() == 7 and writes == ["fill_"]  # settled
    kv.reset()
    assert kv.take_deferred() == 0 and kv.deferred is None and kv.get_seq_length() == 7
    kv.load_prefixes([entry])  # copied: written at once
    assert kv.deferred is None and int(kv.length) == 7


def test_long_inputs_run_the_original_projections():
    torch.manual_seed(0)
    linears = [nn.Linear(32, 32) for _ in range(2)]
    fused = FusedProjections(linears, max_rows=4)
    calls = []
    fused.fused.register_forward_hook(lambda *a: calls.append("fused"))
    fused(torch.randn(1, 4, 32))
    fused(torch.randn(1, 5, 32))
    assert calls == ["fused"]


@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
def test_prefill_step_and_offset_prefill_give_the_same_logits(family, checkpoint_dirs, demo_image):
    """The ways to place tokens (fresh prefill, unpadded or padded after the prompt; prefill after a
    prefix; padded device-position step) compute the same last-token logits as one transformers forward over the whole prompt."""
    adapter = load_checkpoint(checkpoint_dirs[family], None, CPU, torch.float32)
    p = adapter.prepare(demo_image, "What colour is the sky in this picture?")
    with torch.no_grad():
        embeds = adapter.prompt_embeds(p, adapter.encode_image(adapter.pixels_to_device(p)))
        want = adapter.lm_forward(embeds, None)[:, -1]
        dec = fast_decoder(adapter)
        n_prefix, total = p.prefix_tokens, embeds.shape[1]
        kv = dec.new_buffers(256)
        torch.testing.assert_close(dec.prefill(embeds, kv, 0)[:, -1], want, rtol=1e-4, atol=1e-4)
        assert kv.get_seq_length() == total
        # padded to a fixed length after the prompt (the graph engine's captured prefill): the
        # last real token's logits, and the length counts the real tokens only
        kv.reset()
        pad = torch.nn.functional.pad(embeds, (0, 0, 0, 64 - total % 64), value=7.0)
        torch.testing.assert_close(dec.prefill(pad, kv, 0, n_real=torch.tensor(total))[:, -1], want, rtol=1e-4,
                                   atol=1e-4)
        assert kv.get_seq_length() == total
        kv.reset()
        dec.prefill(embeds[:, :n_prefix], kv, 0)
        torch.testing.assert_close(dec.prefill(embeds[:, n_prefix:], kv, n_prefix)[:, -1], want, rtol=1e-4,
                                   atol=1e-4)
        kv.reset()
        dec.prefill(embeds[:, :n_prefix], kv, 0)
        real = total - n_prefix
        padded = torch.nn.functional.pad(embeds[:, n_prefix:], (0, 0, 0, SUFFIX_BUCKETS[-1] - real), value=7.0)
        got = dec.step(padded, torch.tensor(real), kv)
        torch.testing.assert_close(got[:, -1], want, rtol=1e-4, atol=1e-4)
        assert kv.get_seq_length() == total  # the padding is not counted
        # attending over only the columns up to the bucket's end: the same logits
        kv.reset()
        dec.prefill(embeds[:, :n_prefix], kv, 0)
        kv.data[..., n_prefix + SUFFIX_BUCKETS[-1]:, :] = 1e4  # stale columns past the key range
        got = dec.step(padded, torch.tensor(real), kv, key_len=n_prefix + SUFFIX_BUCKETS[-1])
        torch.testing.assert_close(got[:, -1], want, rtol=1e-4, atol=1e-4)
        # traced by torch.compile (as the graph engine's steps are), the several queries of a
        # bucket attend through the matmul path: the same logits
        kv.reset()
        dec.prefill(embeds[:, :n_prefix], kv, 0)
        got = dec.step(padded, torch.tensor(real), kv, torch.compile(dec.layer_at, backend="eager", dynamic=False))
        torch.testing.assert_close(got[:, -1], want, rtol=1e-4, atol=1e-4)


def test_matmul_attention_equals_sdpa_with_grouped_heads_and_batch_masks():
    """The compiled steps' attention (transformers' eager arithmetic) against SDPA: shared kv
    heads, a causal-offset mask [t, keys] and a per-row mask with padding gaps [b, 1, t, keys]."""
    from bench.engines.decoder import _additive

    torch.manual_seed(0)
    cfg = SimpleNamespace(model_type="llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    dec = FastDecoder(SimpleNamespace(embed_tokens=None, norm=None, rotary_emb=None, layers=[]), None, cfg)
    b, t, keys = 2, 5, 24
    q = torch.randn(b, 8, t, 8)
    k, v = torch.randn(b, 2, keys, 8), torch.randn(b, 2, keys, 8)
    cols = 10 + torch.arange(t)
    causal = torch.arange(keys)[None, :] <= cols[:, None]
    valid = torch.ones(b, keys, dtype=torch.bool)
    valid[1, 3:7] = False
    for mask in (causal, (causal[None] & valid[:, None])[:, None]):
        add = _additive(mask, q.dtype)
        torch.testing.assert_close(dec._matmul_attention(q, k, v, add), dec._sdpa(q, k, v, mask=add),
                                   rtol=1e-5, atol=1e-5)


def test_a_suffix_longer_than_every_bucket_prefills_eagerly_after_the_prefix(checkpoint_dirs, demo_image):
    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    engine = StaticEngine(adapter, PrefixKVPolicy(64))
    engine.run(demo_image, "warm-up question", 4)
    q = "Tell me everything " * 20
    assert len(adapter.prepare_text(q).suffix_ids) > SUFFIX_BUCKETS[-1]
    r = engine.run(demo_image, q, 12)
    assert r.cache_hit and r.tokens == reference_generate(adapter, demo_image, q, 12)


def test_engine_detail_says_how_the_request_ran(checkpoint_dirs, demo_image):
    adapter = load_checkpoint(checkpoint_dirs["vila"], None, CPU, torch.float32)
    r = StaticEngine(adapter, CachePolicy()).run(demo_image, "What is shown?", 3)
    assert r.extra["engine_detail"] == "own decoder (qkv:dense,gate_up:dense), static KV, eager"


def test_unsupported_decoder_is_a_skip_reason():
    from bench.errors import VariantUnsupported

    class Cfg:
        model_type = "gpt2"

    with pytest.raises(VariantUnsupported, match="llama, qwen2 decoders, not 'gpt2'"):
        FastDecoder(None, None, Cfg())


@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
def test_teacher_forced_through_the_engine_matches_transformers(family, checkpoint_dirs, demo_image):
    """engine_kl_mean's input: the static engine's prefill + decode steps, fed the baseline's
    tokens, give transformers' log-probs; a wrong decode step would not."""
    from bench.run import fidelity

    adapter = load_checkpoint(checkpoint_dirs[family], None, CPU, torch.float32)
    q = "What is shown?"
    cont = reference_generate(adapter, demo_image, q, 12)
    want = fidelity.teacher_forced_logprobs(adapter, demo_image, q, cont)
    engine = StaticEngine(adapter, CachePolicy())
    got = engine.teacher_forced_logprobs(demo_image, q, cont)
    assert got.shape == want.shape == (12, want.shape[1])
    same = fidelity.kl_mean(want, got)
    assert same < 1e-7
    engine.decoder.layers[-1].down.weight.data.mul_(3.0)  # a numerically different decoder is seen
    assert fidelity.kl_mean(want, engine.teacher_forced_logprobs(demo_image, q, cont)) > 1000 * max(same, 1e-9)


def repeatable_decode_step(engine: StaticEngine, image):
    """After a 2-token request, `step(layer_fn=None, tokens=1)`: the same one-token decode step
    each call (buffers rewound first), or a step of `tokens` copies of that token, through
    `layer_fn` (e.g. a compiled layer) or the eager layer. Call under inference mode."""
    dec = engine.decoder
    token = engine.run(image, "What is shown?", 2).tokens[-1]
    saved, length = engine.cache.data.clone(), engine.cache.length.clone()
    emb = dec.embed(torch.tensor([[token]]))

    def step(layer_fn=None, tokens=1):
        engine.cache.data.copy_(saved)
        engine.cache.length.copy_(length)
        if tokens == 1:
            return dec.step(emb, engine.one, engine.cache, layer_fn)
        return dec.step(emb.repeat(1, tokens, 1), torch.tensor(tokens), engine.cache, layer_fn)

    return step


def test_eager_exact_numerics_make_the_compiled_step_write_what_eager_does(checkpoint_dirs, demo_image):
    """With "eager-exact" numerics (eager's formulas, RMSNorm's mean by ATen's kernel) a compiled
    decode step's logits on the CPU are bit-identical to eager's. "fused" lets inductor sum the
    mean in its own order: with torch 2.13 here its logits differ in the last bits (torch 2.11's
    CPU inductor happens to match). On the H200, with deterministic attention kernels, eager-exact
    leaves none of a layer's outputs off eager's, fused 48%
    (f67f436:results/h200/compile_numerics_llava-1.5-7b-deterministic.csv). So does the graph
    engine's compiled layer_at_deferred (each MLP output added by the next layer), and eagerly it
    is the same arithmetic as layer_at: the same logits, bit for bit. So too its step layer under
    fold_norms (layer_at_folded: each RMSNorm made with the residual add before it, the last
    layer's the model's final norm, which the step's logits then read) where no kernel folds them
    (here: float32 weights, dense)."""
    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    engine = StaticEngine(adapter, CachePolicy())
    dec = engine.decoder
    with torch.inference_mode():
        step = repeatable_decode_step(engine, demo_image)
        want = step()
        assert torch.equal(step(deferring(dec.layer_at_deferred)), want)
        assert torch.equal(step(folding(dec.layer_at_folded)), want)
        forms = {"plain": (dec.layer_at, lambda f: f), "deferred": (dec.layer_at_deferred, deferring),
                 "folded": (dec.layer_at_folded, folding)}
        differ = {}
        try:
            for numerics, form in (("fused", "plain"), ("eager-exact", "plain"), ("eager-exact", "deferred"),
                                   ("eager-exact", "folded")):
                torch._dynamo.reset()
                dec.numerics = numerics
                fn, mark = forms[form]
                got = step(mark(torch.compile(fn, dynamic=False, options=inductor_options(numerics))))
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                differ[numerics, form] = int((got != want).sum())
        finally:
            dec.numerics = "fused"
            torch._dynamo.reset()
    assert [differ["eager-exact", form] for form in forms] == [0, 0, 0], differ


def test_a_folded_step_hands_each_add_and_norm_to_the_kernel_of_o_proj_and_down_proj(checkpoint_dirs, demo_image,
                                                                                      monkeypatch):
    """Where o_proj and down_proj offer to add and normalize in their launch (Int4Linear.add_norm_kernel;
    here a stand-in doing eager's arithmetic in torch ops, so that the wiring is what is checked), a
    traced one-row float16 step under eager-casts numerics (tracing stood in for by
    torch.compiler.is_compiling) hands each layer's o_proj its residual and its second norm, its
    down_proj the next layer's first norm and the last layer's the model's final norm, and reads
    the logits from that: the logits of layer_at_deferred's step, bit for bit. So where the fused
    gate/up projection offers SiLU(gate) * up in its launch (Int4Linear.gate_kernel; a stand-in
    again): each layer's MLP input is asked of it, unless the decoder's fold_gate is off. A step of two
    tokens (offered nothing) gives that step's logits too, its last rows normalized afterwards."""
    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float16)
    engine = StaticEngine(adapter, CachePolicy())
    dec = engine.decoder
    calls = []

    class AddNorm:  # what a kernel's run_add_norm returns, in eager's ops
        def run_add_norm(self, layer, x, residual, norm):
            calls.append((layer, norm))
            h = residual + layer(x)
            hf = h.float()
            return h, norm.weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).half()

    class Gated:  # what a kernel's run_gated returns, in eager's ops
        def run_gated(self, layer, x):
            gated.append(layer)
            gate, up = layer(x).float().chunk(2, dim=-1)
            return (gate / (1 + torch.exp(-gate))).half() * up.half()

    kernel, gate_kernel, gated = AddNorm(), Gated(), []
    final = []  # the rows the model's final norm module takes (the steps' logits after the layers: _row_logits)
    forward = dec.norm.forward
    monkeypatch.setattr(dec.norm, "forward", lambda h: final.append(h.shape[:2]) or forward(h))
    for block in dec.layers:
        for linear in (block.o, block.down):
            monkeypatch.setattr(linear, "add_norm_kernel", lambda rows: kernel if rows == 1 else None, raising=False)
        monkeypatch.setattr(block.gate_up.fused, "gate_kernel", lambda rows: gate_kernel if rows == 1 else None,
                            raising=False)
    monkeypatch.setattr(dec, "numerics", "eager-casts")
    with torch.inference_mode():
        step = repeatable_decode_step(engine, demo_image)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        for tokens, fold_gate in ((1, True), (1, False), (2, True)):
            calls.clear()
            final.clear()
            gated.clear()
            monkeypatch.setattr(dec, "fold_gate", fold_gate)
            want = step(deferring(dec.layer_at_deferred), tokens)
            assert not calls and not gated and final == [(1, 1)]
            final.clear()
            assert torch.equal(step(folding(dec.layer_at_folded), tokens), want), tokens
            assert gated == ([b.gate_up.fused for b in dec.layers] if tokens == 1 and fold_gate else []), tokens
            assert final == ([] if tokens == 1 else [(1, 1)]), final  # two tokens: the last one's row normalized
            final.clear()
            norms = [n for b, after in zip(dec.layers, [*dec.layers[1:], None]) for n in
                     (b.ln2, after.ln1 if after is not None else dec.norm)]
            layers = [m for b in dec.layers for m in (b.o, b.down)]
            assert calls == (list(zip(layers, norms)) if tokens == 1 else []), tokens


def test_the_graph_engine_compiles_the_folded_step_layer_under_fold_norms_and_says_so(checkpoint_dirs, monkeypatch):
    """EngineSpec.fold_norms: the graph engine's step layer is layer_at_folded (marked for
    FastDecoder.step by `folding`), and its engine_detail says each RMSNorm is made with the add
    before it; off (the default), layer_at_deferred and nothing said."""
    from bench.engines.graph import GraphEngine
    from bench.engines.spec import EngineSpec

    monkeypatch.setattr(GraphEngine, "requires_cuda", False)  # (built, not run: no capture here)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    try:
        for fold in (False, True):
            engine = GraphEngine(adapter, CachePolicy(), EngineSpec(numerics="eager-casts", fold_norms=fold))
            assert getattr(engine.layer_fn, "folds_norms", False) == fold
            assert getattr(engine.layer_fn, "defers_residual", False) != fold
            assert ("each RMSNorm with the add before it" in engine.describe()) == fold
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("one_query_matmul", [False, True])
def test_a_compiled_decode_step_attends_by_matmul_where_cudnn_is_off(one_query_matmul, checkpoint_dirs,
                                                                      demo_image, monkeypatch):
    """With `one_query_matmul` (the graph engine sets it under deterministic --attention-kernels)
    a traced one-token step attends through `_matmul_attention` (deterministic, near cuDNN's
    speed) instead of SDPA, and gives the eager step's logits and next token."""
    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    engine = StaticEngine(adapter, CachePolicy())
    dec = engine.decoder
    traced = []
    matmul = dec._matmul_attention
    monkeypatch.setattr(dec, "_matmul_attention", lambda *a: traced.append(a[0].shape[2]) or matmul(*a))
    monkeypatch.setattr(dec, "one_query_matmul", one_query_matmul)
    with torch.inference_mode():
        step = repeatable_decode_step(engine, demo_image)
        want = step()
        torch._dynamo.reset()
        try:
            got = step(torch.compile(dec.layer_at, backend="eager", dynamic=False))
        finally:
            torch._dynamo.reset()
    assert set(traced) == ({1} if one_query_matmul else set())  # traced for the one-query shape only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert int(got.argmax(-1)) == int(want.argmax(-1))
