"""Exact decoding (`StaticExactEngine`, the `graph-exact` engine): transformers' arithmetic, so
the logits are bit-identical to the hf engine's, cold and after a prefix hit, eager and with the
layer parts compiled under eager-exact numerics; what it cannot reproduce is refused."""
import pytest
import torch

from bench.engines.cache_policy import CachePolicy
from bench.engines.hf import HFEngine
from bench.errors import VariantUnsupported
from bench.engines.decoder import fast_decoder, inductor_options
from bench.engines.exact import ExactLayers
from bench.engines.fused_linear import FusedProjections
from bench.models.loader import load_checkpoint
from bench.engines.static import StaticEngine
from bench.engines.static_exact import StaticExactEngine
from variants.prefix import PrefixKVPolicy

CPU = torch.device("cpu")
# a cold request, then prefix hits with a short suffix and with one of more than FEW_QUERIES tokens
QUESTIONS = ("What is shown in this image?", "Colors?",
             "List every object you can see in this picture, from left to right, with its color and size.")


ExactStatic = StaticExactEngine  # the eager engine of graph-exact's calls (graph-exact needs CUDA)


class CompiledExactStatic(ExactStatic):
    """ExactStatic with the layer parts compiled as graph-exact compiles them (inductor on the
    CPU here), under `numerics`."""
    numerics = "eager-exact"

    def __init__(self, adapter, policy, spec=None):
        super().__init__(adapter, policy, spec)
        self.decoder.numerics = self.numerics
        options = inductor_options(self.numerics)
        layers = ExactLayers(self.decoder, lambda fn, dynamic: torch.compile(fn, dynamic=dynamic, options=options))
        self.eager_step_layer, self.eager_prefill_layer = layers.at, layers.from_


@pytest.fixture(scope="module")
def cpu_inductor_rounds_as_eager():
    """Skips a test of compiled parts' bit-equality on the CPU where this torch's CPU inductor does
    not round bf16 as eager does under eager-exact numerics (tests.conftest). The claim is
    graph-exact's on CUDA, where its CUDA tests check it."""
    from tests.conftest import cpu_inductor_rounds_as_eager as rounds_as_eager

    if not rounds_as_eager(torch.bfloat16, "eager-exact"):
        pytest.skip(f"torch {torch.__version__}'s CPU inductor rounds bf16 rotary/SiLU unlike eager "
                    "under eager-exact numerics (graph-exact's bit-equality is checked on CUDA)")


def recorded_logits(engine, image, new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """A cold request, then warm ones (prefix hits) on the engine: every request's tokens and
    every decode step's logits, in order."""
    logits = []
    step = engine.decode_step

    def recording(token, cache):
        out = step(token, cache)
        logits.append(out.clone())
        return out

    engine.decode_step = recording
    tokens = []
    for q in QUESTIONS:
        r = engine.run(image, q, new_tokens)
        tokens.append(r.tokens)
    assert r.cache_hit
    return tokens, logits


@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
def test_exact_engine_gives_transformers_logits_bit_for_bit(family, checkpoint_dirs, demo_image):
    """bf16 (where near-ties are common): every decode logit of a cold and two warm requests is
    bit-identical to the hf engine's, and so are the tokens; the default static engine's are not
    (fused projections, its own masks and attention lengths, a one-row final norm)."""
    adapter = load_checkpoint(checkpoint_dirs[family], None, CPU, torch.bfloat16)
    want_tokens, want = recorded_logits(HFEngine(adapter, PrefixKVPolicy(64)), demo_image, 24)
    tokens, got = recorded_logits(ExactStatic(adapter, PrefixKVPolicy(64)), demo_image, 24)
    assert tokens == want_tokens
    assert len(got) == len(want) == len(QUESTIONS) * 23 and all(torch.equal(g, w) for g, w in zip(got, want))
    _, static = recorded_logits(StaticEngine(adapter, PrefixKVPolicy(64)), demo_image, 24)
    assert not all(torch.equal(g, w) for g, w in zip(static, want))


def test_compiled_exact_layers_keep_the_logits_bit_identical(checkpoint_dirs, demo_image, cpu_inductor_rounds_as_eager):
    """graph-exact's compiled parts (eager-exact numerics) change nothing: teacher-forced log-probs
    bit-identical to the hf engine's; compiled with inductor's own ("fused") numerics they are not."""
    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.bfloat16)
    q = QUESTIONS[0]
    cont = HFEngine(adapter, CachePolicy()).run(demo_image, q, 16).tokens
    want = HFEngine(adapter, CachePolicy()).teacher_forced_logprobs(demo_image, q, cont)

    class Fused(CompiledExactStatic):
        numerics = "fused"

    got = {}
    try:
        for cls in (CompiledExactStatic, Fused):
            torch._dynamo.reset()
            got[cls.numerics] = cls(adapter, CachePolicy()).teacher_forced_logprobs(demo_image, q, cont)
    finally:
        torch._dynamo.reset()
        fast_decoder(adapter).numerics = "fused"
    assert torch.equal(got["eager-exact"], want)
    assert not torch.equal(got["fused"], want)


def test_exact_fusion_only_where_the_fused_gemm_is_bit_equal():
    """A projection group runs fused under exact decoding only at row counts where the fused GEMM
    gave the separate modules' outputs exactly; a fused copy that drifted is caught."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=False) for n in (32, 16, 16)]
    group = FusedProjections(linears)
    assert group.bit_equal_at(1, CPU, torch.float32)
    other = FusedProjections([torch.nn.Linear(64, n, bias=False) for n in (32, 16)])
    with torch.no_grad():  # the fused copy drifts from the separate weights (no longer their views)
        other.fused.weight.data = other.fused.weight.data.clone()
        other.fused.weight[3, 5] += 1e-3
    assert not other.bit_equal_at(1, CPU, torch.float32)
    unfusable = FusedProjections([torch.nn.Linear(64, 8), torch.nn.Linear(32, 8)])
    assert not unfusable.bit_equal_at(1, CPU, torch.float32)
    # exact: fused at a row count only where checked bit-equal there, never above max_rows
    group.exact_check = other.exact_check = (CPU, torch.float32)
    group.max_rows = other.max_rows = 4
    assert group.runs_fused(1) and group.runs_fused(3) and not group.runs_fused(5)
    assert not other.runs_fused(1) and not other.runs_fused(3)
    assert {k[0] for k in group._bit_equal} == {1, 3}  # checked per row count met, and only those


class _RecordingAttention:
    """A stand-in FastDecoder for ExactLayers.attend: records how each attention call got its
    keys and mask; `differs` makes the views + additive way give other bits than transformers'."""
    exact_norm_at = exact_rotate_write_at = exact_out_norm_at = exact_mlp_at = exact_qkv_from = exact_out_from = None

    def __init__(self, differs: bool):
        self.differs, self.calls = differs, []

    def attend_hf(self, block, q, k, v, mask):
        way = ("contiguous" if k.is_contiguous() else "views",
               None if mask is None else ("boolean" if mask.dtype == torch.bool else "additive"))
        self.calls.append(way)
        out = q.clone()
        return out + 1 if self.differs and way == ("views", "additive") else out


def _exact_mask(t: int, end: int):
    from bench.engines.decoder import _additive
    from bench.engines.exact import ExactMask

    boolean = (torch.arange(end)[None, :] <= (end - t + torch.arange(t))[:, None])[None, None]
    return ExactMask(boolean, _additive(boolean, torch.float32))


@pytest.mark.parametrize("differs", [False, True])
def test_exact_attention_reads_views_only_where_checked_bit_equal(differs):
    """16+ queries (cuDNN's plans follow strides): the first call at a shape runs both ways and
    returns transformers' (contiguous keys, boolean mask); later calls at that shape read views
    of the buffers with the additive mask only if the two agreed bit for bit. Fewer queries
    always read views, with the boolean mask, unchecked."""
    dec = _RecordingAttention(differs)
    layers = ExactLayers(dec)
    keys, values = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    q = torch.randn(1, 2, 16, 8)
    layers.attend(None, q, keys, values, 40, _exact_mask(16, 40))
    assert sorted(dec.calls) == [("contiguous", "boolean"), ("views", "additive")]
    assert layers.views_match == {((1, 2, 16, 8), 40, True): not differs}
    dec.calls.clear()
    out = layers.attend(None, q, keys, values, 40, _exact_mask(16, 40))
    assert dec.calls == [("contiguous", "boolean") if differs else ("views", "additive")]
    assert torch.equal(out, q)  # transformers' bits either way
    dec.calls.clear()
    layers.attend(None, q[:, :, :3], keys, values, 40, _exact_mask(3, 40))
    assert dec.calls == [("views", "boolean")] and len(layers.views_match) == 1
    want = "contiguous copies + boolean mask at 16 queries" if differs else "views + additive mask at 16 queries"
    assert want in layers.describe()


def test_exact_engine_runs_one_request_at_a_time(checkpoint_dirs, demo_image):
    """Padded batches use masks transformers builds its own way: a batch is refused (a skipped
    row), a single request runs."""
    adapter = load_checkpoint(checkpoint_dirs["vila"], None, CPU, torch.float32)
    engine = ExactStatic(adapter, CachePolicy())
    with pytest.raises(VariantUnsupported, match="one request at a time"):
        engine.run_batch([(demo_image, "What?"), (demo_image, "Why is it here?")], 4)
    assert len(engine.run(demo_image, "What?", 4).tokens) == 4
    assert "transformers' arithmetic" in engine.describe()


def test_exact_decoding_refuses_an_attention_it_does_not_reproduce(checkpoint_dirs):
    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    config = adapter.text_config()
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        with pytest.raises(VariantUnsupported, match="reproduces transformers' sdpa attention; this model runs 'eager'"):
            ExactStatic(adapter, CachePolicy())
    finally:
        config._attn_implementation = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_exact_engine_repeats_hf_from_captured_graphs(dtype, checkpoint_dirs, demo_image):
    """graph-exact on a GPU: teacher-forced log-probs bit-identical to the hf engine's, a cold and
    a warm request's tokens equal to its, from one decode graph per attended length that the
    next request reuses rather than recaptures."""
    from bench.engines.graph_exact import GraphExactEngine

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, torch.device("cuda"), dtype)
    hf = HFEngine(adapter, PrefixKVPolicy(64))
    want_tokens = [hf.run(demo_image, q, 16).tokens for q in QUESTIONS]
    want = HFEngine(adapter, CachePolicy()).teacher_forced_logprobs(demo_image, QUESTIONS[0], want_tokens[0])
    engine = GraphExactEngine(adapter, PrefixKVPolicy(64))
    cold = engine.run(demo_image, QUESTIONS[0], 16)
    assert cold.tokens == want_tokens[0]
    decode = {k for k in engine.lm_graphs if k[0] == "decode"}
    assert decode == {("decode", 1, cold.prompt_tokens + i) for i in range(1, 16)}
    for q, want_q in zip(QUESTIONS[1:], want_tokens[1:]):  # warm: exact-length suffixes, short and long
        assert engine.run(demo_image, q, 16).tokens == want_q, q
    assert any(k[0] == "suffix ids" for k in engine.lm_graphs)
    engine.policy.clear()
    assert engine.run(demo_image, QUESTIONS[0], 16).tokens == want_tokens[0]
    assert engine.lm_graphs.keys() >= decode and ("prefill", cold.prompt_tokens) in engine.lm_graphs
    got = GraphExactEngine(adapter, CachePolicy()).teacher_forced_logprobs(demo_image, QUESTIONS[0], want_tokens[0])
    assert torch.equal(got, want)


class _ReplayedCall:
    """A stand-in CUDA graph for the CPU: replay() runs the call again and writes its result into
    the tensor the capture returned, as a graph replay writes its static output."""

    def __init__(self, call, out):
        self.call, self.out = call, out

    def replay(self):
        self.out.copy_(self.call())


def fake_capture(self, call, what, rewind, warmups=2, pool=None):
    """GraphEngine._capture without CUDA: the same warm-ups and rewinds, then the call run once
    for its output tensor (a capture runs nothing: rewound again after)."""
    saved = self.cache.positions() if rewind else None
    for _ in range(warmups + 1):
        out = call()
        if rewind:
            self.cache.set_positions(saved)
    return _ReplayedCall(call, out), out


@pytest.fixture
def stand_in_capture(monkeypatch):
    """The graph engines on the CPU: every capture stood in by `fake_capture`."""
    from bench.engines.graph import GraphEngine

    monkeypatch.setattr(GraphEngine, "_capture", fake_capture)
    monkeypatch.setattr(GraphEngine, "requires_cuda", False)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


def uncompiled(engine):
    """A graph engine whose captured calls run its layers uncompiled (no compiling here): its eager
    layer functions, or where it has none (the graph engine) the decoder's own in the form the
    engine compiles them (its step layer deferring each MLP residual add), so the captured
    prefill paths still run. Its steps must not fall back as after a compile failure (`notes`:
    that would hide any error in the layers)."""
    from bench.engines.decoder import deferring

    engine.layer_fn = engine.eager_step_layer or deferring(engine.decoder.layer_at_deferred)
    engine.prefill_fn = engine.eager_prefill_layer or engine.decoder.layer_from
    engine._lm_step = lambda embeds, n_real, key_len=None: engine.step_call(embeds, n_real, key_len)
    return engine


def test_graph_exact_bookkeeping_gives_hf_tokens_with_a_stand_in_capture(checkpoint_dirs, demo_image,
                                                                         stand_in_capture):
    """graph-exact's own logic on the CPU (captures stood in by re-running the call): a decode
    graph per attended length whose warm-ups do not disturb the token being decoded, exact-length
    prefill and suffix graphs, graphs reused by later requests; tokens and teacher-forced
    log-probs the hf engine's, bit for bit (bf16)."""
    from bench.engines.graph_exact import GraphExactEngine

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.bfloat16)
    hf = HFEngine(adapter, PrefixKVPolicy(64))
    want = [hf.run(demo_image, q, 12).tokens for q in QUESTIONS]
    engine = GraphExactEngine(adapter, PrefixKVPolicy(64))
    assert "(compiled layers" in engine.describe() and "compiled prefill" in engine.describe()
    engine = uncompiled(engine)
    assert "(uncompiled layers" in engine.describe() and "prefill eager" in engine.describe()  # says what runs
    cold = engine.run(demo_image, QUESTIONS[0], 12)
    assert cold.tokens == want[0]
    n = cold.prompt_tokens
    assert {k for k in engine.lm_graphs if k[0] == "decode"} == {("decode", 1, n + i) for i in range(1, 12)}
    assert ("prefill", n) in engine.lm_graphs
    warm = engine.run(demo_image, QUESTIONS[1], 12)
    assert warm.cache_hit and warm.tokens == want[1]
    t = warm.prompt_tokens - warm.cached_tokens
    assert ("suffix ids", t, warm.prompt_tokens, 1) in engine.lm_graphs
    long = engine.run(demo_image, QUESTIONS[2], 12)  # 16+ queries: views of the buffers once checked
    assert long.cache_hit and long.tokens == want[2]
    t = long.prompt_tokens - long.cached_tokens
    assert f"views + additive mask at {t} queries (bit-equal)" in engine.describe()
    before = len(engine.lm_graphs)
    engine.policy.clear()
    assert engine.run(demo_image, QUESTIONS[0], 12).tokens == want[0]
    assert len(engine.lm_graphs) == before  # every length already had its graph
    logprobs = HFEngine(adapter, CachePolicy()).teacher_forced_logprobs(demo_image, QUESTIONS[0], want[0])
    assert torch.equal(engine.teacher_forced_logprobs(demo_image, QUESTIONS[0], want[0]), logprobs)
    assert "a graph per attended length" in engine.describe()


@pytest.mark.parametrize("family", ["vila", "internvl"])
def test_graph_exact_bookkeeping_on_other_families(family, checkpoint_dirs, demo_image, stand_in_capture):
    """The same stand-in capture on VILA (Llama LLM) and InternVL (Qwen2: q/k/v biases, grouped
    kv heads): a cold and a warm request give the hf engine's tokens."""
    from bench.engines.graph_exact import GraphExactEngine

    adapter = load_checkpoint(checkpoint_dirs[family], None, CPU, torch.bfloat16)
    hf = HFEngine(adapter, PrefixKVPolicy(64))
    want = [hf.run(demo_image, q, 12).tokens for q in QUESTIONS]
    engine = uncompiled(GraphExactEngine(adapter, PrefixKVPolicy(64)))
    assert [engine.run(demo_image, q, 12).tokens for q in QUESTIONS] == want


def test_benchmark_reports_graph_exact_as_hf_exactly(tmp_path, monkeypatch, stand_in_capture,
                                                    cpu_inductor_rounds_as_eager):
    """Through the whole benchmark (bf16 on the CPU, captures stood in, parts compiled by
    inductor as on a GPU), cold and warm requests: graph-exact's rows report token_agree 1,
    engine_top1_agree 1 and engine_kl_mean 0 against the hf baseline, and say how they ran."""
    import csv

    from bench.cli import run_main
    from variants.base import GraphExactEnginePart

    monkeypatch.setattr(GraphExactEnginePart, "requires_cuda", False)
    out = tmp_path / "o"
    try:
        assert run_main(["--preset", "tiny-llava", "--variants", "prefix", "--engine", "graph-exact",
                         "--num-runs", "2", "--min-seconds", "0", "--max-new-tokens", "12", "--warmup", "1",
                         "--text-prompt", "What is here?",
                         "--device", "cpu", "--dtype", "bfloat16", "--output-dir", str(out)]) == 0
    finally:
        torch._dynamo.reset()
    rows = [r for r in csv.DictReader(open(out / "runs.csv")) if r["kind"] == "measured"]
    assert {r["variant"] for r in rows} == {"prefix+graph-exact"}
    assert {r["cache_state"] for r in rows} == {"cold", "warm"}
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["token_agree"]) == 1.0 and float(r["engine_top1_agree"]) == 1.0, r
        assert float(r["engine_kl_mean"]) == 0.0, r
        assert "transformers' arithmetic" in r["engine_detail"] and "eager-exact numerics" in r["engine_detail"]


def test_graph_engine_replays_a_decode_graph_per_attended_length_with_a_stand_in_capture(checkpoint_dirs,
                                                                                        demo_image, stand_in_capture):
    """The decode mechanism graph-exact shares with `graph` (stand-in captures, uncompiled): the
    graph engine's steps attend over the columns written so far rounded up to the spec's
    key_round, not over the whole buffers, a graph per batch size and such length replayed for
    every token that reaches it; the static engine's tokens, cold and warm, and a request whose
    keys cross a multiple of key_round replays two graphs."""
    from bench.engines.graph import GraphEngine

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    static = StaticEngine(adapter, PrefixKVPolicy(64))
    want = [static.run(demo_image, q, 60).tokens for q in QUESTIONS]
    engine = uncompiled(GraphEngine(adapter, PrefixKVPolicy(64)))
    got = [engine.run(demo_image, q, 60) for q in QUESTIONS]
    assert [r.tokens for r in got] == want
    k = engine.spec.key_round
    ends = {-(-(r.prompt_tokens + i) // k) * k for r in got for i in range(1, 60)}  # columns a step attends to
    assert len(ends) >= 2 and min(ends) < engine.max_len  # crossed a multiple; short of the whole buffers
    assert {key for key in engine.lm_graphs if key[0] == "decode"} == {("decode", 1, e) for e in ends}
    assert f"a graph per {k} attended columns" in engine.describe()


def test_aligned_additive_mask_has_the_values_of_sdpas_own():
    """The exact layers' additive mask: SDPA's conversion of the boolean one, value for value,
    in rows that start 16 bytes apart (fp16: a multiple of 8 columns)."""
    from bench.engines.decoder import _additive
    from bench.engines.exact import _additive_aligned

    boolean = (torch.arange(647)[None, :] <= (628 + torch.arange(19))[:, None])[None, None]
    for dtype, per_row in ((torch.float16, 648), (torch.float32, 648), (torch.bfloat16, 648)):
        got = _additive_aligned(boolean, dtype)
        assert got.shape == (1, 1, 19, 647) and got.stride(-2) == per_row
        assert torch.equal(got, _additive(boolean, dtype))


def test_graph_engine_batch_on_one_question_replays_its_prefix_and_suffix_graphs(checkpoint_dirs, demo_image,
                                                                                   stand_in_capture):
    """The graph engine's own bookkeeping for a batch asking one question about one image (the
    benchmark's batches), captures stood in: cold, the shared prefix is prefilled once by a graph
    captured on the kept scratch row, then every row's suffix by one suffix graph of the batch;
    warm, that suffix graph alone; a cold batch on another image replays both graphs. Each row
    gives the request's tokens alone."""
    from bench.engines.graph import GraphEngine
    from PIL import ImageOps

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    hf = HFEngine(adapter, CachePolicy())
    q, other = QUESTIONS[1], ImageOps.mirror(demo_image)
    engine = uncompiled(GraphEngine(adapter, PrefixKVPolicy(64)))
    limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
    assert limit >= 256  # a compiled step layer per graph's shape, not 8
    cold = engine.run_batch([(demo_image, q)] * 3, 12)
    assert not cold.cache_hit and cold.batch_tokens == [hf.run(demo_image, q, 12).tokens] * 3
    scratch = [k for k in engine.lm_graphs if k[0] == "scratch prefill"]
    suffix = [k for k in engine.lm_graphs if k[0] == "suffix ids"]
    assert len(scratch) == 1 and len(suffix) == 1 and suffix[0][3] == 3
    assert not any(k[0] == "prefill" for k in engine.lm_graphs)  # the batch's rows are never prefilled whole
    warm = engine.run_batch([(demo_image, q)] * 3, 12)
    assert warm.cache_hit and warm.batch_tokens == cold.batch_tokens
    graphs = len(engine.lm_graphs)
    again = engine.run_batch([(other, q)] * 3, 12)
    assert not again.cache_hit and again.batch_tokens == [hf.run(other, q, 12).tokens] * 3
    assert len(engine.lm_graphs) == graphs  # both graphs replayed, none captured
    engine.run(demo_image, q, 2)  # one row: new working buffers, the scratch row dropped with them
    assert engine._scratch is None and not any(k[0] == "scratch prefill" for k in engine.lm_graphs)



def test_graph_engine_captures_a_whole_batch_prefill_per_length_bucket_with_a_stand_in_capture(
        checkpoint_dirs, demo_image, stand_in_capture):
    """A batch of prompts of unequal length, no prefix cache (the benchmark's fp16 and awq4 batch
    rows): laid out at the longest rounded up to prefill_round and prefilled by one graph of
    the batch's shape, captured once and replayed for another batch of that bucket; each row
    gives the request's tokens alone. Past batch_prefill_tokens, or with the spec's 0, nothing is
    captured and the rows keep their own length."""
    import dataclasses

    from PIL import ImageOps

    from bench.engines.graph import GraphEngine

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    hf = HFEngine(adapter, CachePolicy())
    other = ImageOps.mirror(demo_image)
    longer = QUESTIONS[2] + " Answer in one sentence."  # the longest prompt is not a multiple of the bucket
    first = [(demo_image, QUESTIONS[0]), (other, QUESTIONS[1]), (demo_image, longer)]
    second = [(other, longer), (demo_image, QUESTIONS[0]), (other, QUESTIONS[2])]
    want = {id(b): [hf.run(v, q, 8).tokens for v, q in b] for b in (first, second)}
    engine = uncompiled(GraphEngine(adapter, CachePolicy()))
    laid = []
    prefill = engine.prefill
    engine.prefill = lambda e, c, s, v=None: laid.append(tuple(e.shape[:2])) or prefill(e, c, s, v)
    assert engine.run_batch(first, 8).batch_tokens == want[id(first)]
    round_ = engine.spec.prefill_round
    keys = [k for k in engine.lm_graphs if k[0] == "batch prefill"]
    assert keys == [("batch prefill", 3, laid[0][1])] and laid[0][1] % round_ == 0
    longest = max(adapter.prepare_text(q, v).prompt_tokens for v, q in first)
    assert longest < laid[0][1] == -(-longest // round_) * round_  # the gaps widened to the bucket
    assert engine.run_batch(second, 8).batch_tokens == want[id(second)]
    assert [k for k in engine.lm_graphs if k[0] == "batch prefill"] == keys  # replayed, not captured again
    assert "a batch's whole CUDA-graphed" in engine.describe()
    # rows of one length that is a bucket's already: no gap at all, every column real
    q = QUESTIONS[0]
    while adapter.prepare_text(q, demo_image).prompt_tokens % round_:
        q += " and"  # a token a word
    even = [(demo_image, q), (other, q)]
    width = adapter.prepare_text(q, demo_image).prompt_tokens
    assert engine.run_batch(even, 8).batch_tokens == [hf.run(v, q, 8).tokens for v, q in even]
    assert ("batch prefill", 2, width) in engine.lm_graphs and laid[-1] == (2, width)

    for limit in (0, 3 * laid[0][1] - 1):  # off, or one token short of the batch's padded prefill
        laid.clear()
        spec = dataclasses.replace(GraphEngine.default_spec, batch_prefill_tokens=limit)
        engine = uncompiled(GraphEngine(adapter, CachePolicy(), spec))
        prefill = engine.prefill
        engine.prefill = lambda e, c, s, v=None: laid.append(tuple(e.shape[:2])) or prefill(e, c, s, v)
        assert engine.run_batch(first, 8).batch_tokens == want[id(first)]
        assert laid == [(3, longest)] and not any(k[0] == "batch prefill" for k in engine.lm_graphs)
        assert ("a batch's whole" in engine.describe()) == bool(limit)

    # a capture that fails after its warm-ups advanced the rows: said in engine_detail, the
    # uncaptured prefill runs from a reset and gives the same tokens, and no capture is tried again
    engine = uncompiled(GraphEngine(adapter, CachePolicy()))
    capture = engine._capture
    tried = []

    def failing(call, what, rewind, warmups=2, pool=None):
        if what.startswith("batch prefill"):
            tried.append(what)
            call()
            raise VariantUnsupported(f"{what} cannot be captured in a CUDA graph: test")
        return capture(call, what, rewind, warmups, pool)

    engine._capture = failing
    for batch in (first, second):
        assert engine.run_batch(batch, 8).batch_tokens == want[id(batch)]
        # each row's positions went on from its own prompt (tokens of a tiny model hardly move with them)
        assert engine.cache.next_pos.tolist() == [adapter.prepare_text(q, v).prompt_tokens + 7 for v, q in batch]
    assert "batch prefill graph: not captured" in engine.describe() and "a batch's whole" not in engine.describe()
    assert len(tried) == 1  # the second batch is not captured again


def test_graph_engine_teacher_forced_logprobs_keep_every_step_in_fp32(checkpoint_dirs, demo_image, stand_in_capture):
    """The fidelity probe's log-probs on the graph engine in fp32: each decode step's row is a
    copy, not the graph's output buffer the next replay overwrites (rows would all be the last
    step's); the static engine's log-probs (captures stood in)."""
    from bench.engines.graph import GraphEngine

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    static = StaticEngine(adapter, CachePolicy())
    continuation = static.run(demo_image, QUESTIONS[0], 8).tokens
    want = static.teacher_forced_logprobs(demo_image, QUESTIONS[0], continuation)
    got = uncompiled(GraphEngine(adapter, CachePolicy())).teacher_forced_logprobs(demo_image, QUESTIONS[0], continuation)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
