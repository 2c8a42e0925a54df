"""One-query attention over the static KV buffers split along the keys ("flash-decoding"): the
decode step's attention as one Triton kernel (Config.fused_combine; two where it is off) instead
of a scores GEMM, a softmax and a values GEMM.

Why: a decode step's attention reads every row's keys and values up to the attended length once.
Done as two batched GEMMs of one query row (FastDecoder._matmul_attention), each is a
latency-bound GEMV over a few MB with the softmax between them: in llava-1.5-7b's batch-1 step
on the H100 they were 64 GEMMs of about 6 us each over 1024 columns, about a third of the
memory bandwidth (aab5f08:results/reference/h100/llava-1.5-7b-int4-graph-batch/decode_profile_rtn4_b1.csv).
Split along the keys, enough programs read at once to reach the bandwidth: program (row, kv head,
split) reads its keys and values once for all query heads sharing that kv head, keeps a running
max, sum and weighted values (the online softmax), and the splits are combined: by a second
kernel, or (Config.fused_combine) by the program of each row and kv head that finishes last,
which finds it is last by an atomic count (the threadfence-reduction pattern of CUDA's
samples): one launch a layer fewer. On an H100 that shortened vila1.5-3b's int4 decode step in
every round, with the two-kernel output bit for bit (results/lab/h100/fused-combine_ab_vila1.5-3b.csv;
tests/test_split_kv_attention.py on CUDA).

Deterministic: the split count is a function of the shapes and the device, and the splits are
combined in a fixed order, so repeated calls give the same output (unlike cuDNN's one-query
kernel: bench.engines.attention_kernels). Scores and the softmax are in fp32 (the matmul path
rounds scores to fp16 first, as transformers' eager attention does), so outputs differ from it
by rounding; fp32 inputs are multiplied in IEEE fp32, not TF32.

Written here because no maintained library ships a split-KV decode kernel for strided static
buffers that torch.compile and CUDA graphs take as they are (FlashAttention's
flash_attn_with_kvcache does it for its own cache layout and needs a wheel built for the torch
and CUDA at hand).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench import pdl as pdl_settings
from bench.pdl import enabled as pdl_enabled

try:
    import triton
    import triton.language as tl

    from bench.pdl import prefetch_l2
except ImportError:  # CPU builds of torch: the engines attend by matmul or SDPA
    triton = None

BLOCK_L = 64  # keys per loop iteration
MIN_GROUP_ROWS = 16  # tl.dot's smallest M: query heads of one kv head, padded up to it
# splits whose weighted values the combining kernel holds at once (registers); a row of no more splits
# is read in one go, one round trip to L2 where 8 at a time made three: on an H100 that shortened
# llava-1.5-7b's one-row attention at 640 keys (10 splits) and its int4 step in every round
# (results/lab/h100/decode_attention_combine_llava-1.5-7b.csv, split-kv_ab_llava-1.5-7b.csv)
COMBINE_CHUNK = 16
# products a thread may hold by broadcast multiply-and-sum (Config.dot False) before the launch takes
# tl.dot instead: 7 query heads padded to 8 x 32 keys x 128 (Qwen2-7B's) spill on sm_90 at 4 warps
BROADCAST_REGISTERS = 64


@dataclass(frozen=True)
class Config:
    """How the partial kernel is launched: `block` keys per loop iteration (a power of two of 16
    or more), splits enough for `programs_per_sm` programs per SM, scores and weighted values by
    `dot` (tensor cores; the query heads of a kv head padded to MIN_GROUP_ROWS rows) or by
    broadcast multiply-and-sum in fp32 (CUDA cores; the query heads padded to a power of two
    only; tl.dot all the same where those products would pass BROADCAST_REGISTERS a thread),
    `num_warps` warps a program; the splits combined by a second kernel or, `fused_combine`, by
    the partial kernel's last program of each row and kv head, `combine_chunk` splits' weighted
    values at a time (a power of two; where there are no more splits than that, all of a row's
    partials are read at once); `prefetch`: launched with PDL, each program asks L2 for its
    split's keys and values before its wait; `q_with_keys`: the query read with each block's keys
    (copied asynchronously with them) instead of before the loop (whose copy into shared memory
    must arrive before the keys are asked for); `num_stages`: the keys loop's pipeline stages
    (Triton's; 2 holds half the shared memory of 3, so more programs fit on an SM; fp32 inputs 3);
    `rotary`: the engines' compiled one-query steps hand the query over unrotated, with its
    position's cos and sin, and the partial kernel rotates it (one kernel a layer fewer: the
    query's rotation no longer a kernel of its own), rounding as their numerics do: op by op as
    eager does under the eager numerics (the same bits), once under "fused"
    (bench.engines.decoder.FastDecoder._attend_at). On an H100 that shortened llava-1.5-7b's int4
    step in every round with the same tokens (results/lab/h100/split-kv_ab_rotary_llava-1.5-7b.csv).
    `write_kv`: the graph engine's compiled one-query step (FastDecoder.layer_at_deferred, whose
    layer buffers are one `pair`) hands the step's new key (unrotated, under `rotary`) and value to
    the partial kernel, whose program holding their column writes them into the layer's buffers
    before reading its keys (op split_kv_attention_writing): the key's rotation and the write no
    longer a kernel of their own; under the eager numerics the same buffers and tokens bit for bit
    (under "fused" the key is rounded once, as the query is). On an H100 that shortened
    llava-1.5-7b's fp16 and int4 steps and vila1.5-3b's fp16 step in every round and lengthened
    vila1.5-3b's int4 step by less than 1% (results/lab/h100/split-kv_ab_write_kv_*.csv).
    `preload`: each program loads its split's first block of keys, values and mask into registers
    before its PDL wait (the kernel before wrote none of them), and, where it wrote the step's new
    key and value (write_kv), their column again after the write: only where the kernel writes
    them (else the write is a kernel of its own, before this one, whose output a load before the
    wait must not read) and the mask is the caller's (not zeros made for None by the launch just
    before), or without PDL (where it changes nothing but the order of the loads).
    On an H100 it lengthened llava-1.5-7b's int4 step by about 0.14 ms and vila1.5-3b's by about
    0.01 in every round, with the same tokens (results/lab/h100/split-kv_ab_preload_*.csv), the
    attention kernel itself longer (decode_profile_llava-1.5-7b-rtn4-f16x2-preload.csv): off.
    `pos_early`: under write_kv, each program reads the new column's index (the step's position,
    which the engines' steps compute at their start, never the kernel before) before its PDL wait
    instead of after it, where every program's keys waited for it. On an H100 it changed neither
    preset's int4 step beyond the rounds' spread, alone or with causal_mask, with the same tokens
    (results/lab/h100/split-kv_ab_pos_causal_*.csv): off.
    `causal_mask`: under write_kv, the engines' one-row steps (whose mask is the causal one: every
    column up to the new one) hand the kernel no mask, and it attends to the columns up to the new
    one, the mask made from the column's index instead of read after the keys (one round trip to
    memory fewer), the columns past it not read (the same bits: FastDecoder._attend_at). On an
    H100 it shortened llava-1.5-7b's and vila1.5-3b's int4 steps in every round, with the same
    tokens (results/lab/h100/split-kv_ab_pos_causal_*.csv), the attention kernel itself shorter
    (decode_profile_llava-1.5-7b-rtn4-f16x2-causal1.csv against -causal0.csv): on.
    A label without some fields (one written before they were fields) parses to today's defaults
    for them, not to what was launched then (fused_combine=1 meant 8 splits at a time, 3 stages).

    Measured on an H100 (results/lab/h100/decode_attention_stages_llava-1.5-7b.csv; the step:
    split-kv_ab_stages_llava-1.5-7b.csv): 2 stages shortened llava-1.5-7b's attention at 16 rows
    and at one row over 1024 keys and left it at 640 keys, the step level; the query with the keys
    shortened it a little more at 2 stages, by less than a step shows: off. Prefetching lengthened
    the step (split-kv_ab_llava-1.5-7b.csv): off. The engine launches DEFAULT;
    lab/gpu_decode_attention.py --configs and lab/gpu_step_ab.py --ab split-kv time others."""

    block: int = BLOCK_L
    programs_per_sm: int = 2
    dot: bool = True
    num_warps: int = 4
    fused_combine: bool = True
    combine_chunk: int = COMBINE_CHUNK
    prefetch: bool = False
    q_with_keys: bool = False
    num_stages: int = 2
    rotary: bool = True
    write_kv: bool = True
    preload: bool = False
    pos_early: bool = False
    causal_mask: bool = True

    def __post_init__(self):
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"split-kv block {self.block}: a power of two of 16 or more")
        if self.combine_chunk < 2 or self.combine_chunk & (self.combine_chunk - 1):
            raise ValueError(f"split-kv combine_chunk {self.combine_chunk}: a power of two of 2 or more")
        if self.num_stages < 1:
            raise ValueError(f"split-kv num_stages {self.num_stages}: 1 or more")
        if self.programs_per_sm < 1 or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"split-kv config {self}: programs_per_sm at least 1, num_warps a power of two to 16")

    def label(self) -> str:
        """As `parse` reads it."""
        return ",".join(f"{name}={int(getattr(self, name))}" for name in self.__dataclass_fields__)

    @classmethod
    def parse(cls, text: str) -> "Config":
        """'block=32,dot=0' (any of the fields; the others DEFAULT's); ValueError naming what is wrong."""
        fields = {}
        for part in filter(None, text.split(",")):
            name, _, value = part.partition("=")
            if name not in cls.__dataclass_fields__ or not value.isdigit():
                raise ValueError(f"split-kv config {text!r}: {part!r} is not one of "
                                 f"{', '.join(cls.__dataclass_fields__)} = a whole number")
            fields[name] = bool(int(value)) if cls.__dataclass_fields__[name].type in (bool, "bool") else int(value)
        return cls(**fields)


DEFAULT = Config()


def unavailable(device: torch.device, heads: int | None = None, kv_heads: int | None = None,
                head_dim: int | None = None) -> str | None:
    """Why the split-KV kernels cannot run on `device` (for a model of `heads` query heads,
    `kv_heads` key/value heads and `head_dim`, where given: what `launches` takes), or None."""
    if triton is None:
        return "split-kv decode attention needs Triton"
    if device.type != "cuda":
        return "split-kv decode attention runs on CUDA only"
    return _shape_problem(heads, kv_heads, head_dim)


def _shape_problem(heads: int | None, kv_heads: int | None, head_dim: int | None) -> str | None:
    """Why the kernels cannot take a model of this geometry (None where given parts are fine)."""
    if head_dim is not None and (head_dim & (head_dim - 1) or head_dim < 16):
        return f"split-kv decode attention takes a power-of-two head size of 16 or more, not {head_dim}"
    if heads is not None and kv_heads is not None and heads % kv_heads:
        return f"split-kv decode attention takes query heads a multiple of kv heads, not {heads} and {kv_heads}"
    return None


def splits_for(batch: int, kv_heads: int, keys: int, programs: int, block: int = BLOCK_L) -> tuple[int, int]:
    """(keys per split, a multiple of `block`; number of splits) for `keys` keys: enough splits
    that batch x kv_heads x splits programs reach `programs` (e.g. twice the SMs), none shorter
    than one block."""
    blocks = -(-keys // block)
    want = max(1, min(blocks, -(-programs // max(1, batch * kv_heads))))
    per = max(1, blocks // want) * block  # rounded down: at least `want` splits
    return per, -(-keys // per)


if triton is not None:
    # q cos + rotate_half(q) sin as eager computes it in `dtype`: $0 = fp32(round(q c)) + fp32(round(h s))
    # ($1 q, $2 cos, $3 rotate_half(q), $4 sin, all fp32), each product and the sum rounded to nearest
    # (explicit .rn: never contracted into an FMA), the products rounded to fp16 / bf16 (not for fp32)
    _ROPE = """{{
    .reg .f32 a, r;
    .reg .b16 h;
    mul.rn.f32 a, $1, $2;
    {round_a}
    mul.rn.f32 r, $3, $4;
    {round_r}
    add.rn.f32 $0, a, r;
    }}"""
    _ROPE_F16 = tl.constexpr(_ROPE.format(round_a="cvt.rn.f16.f32 h, a; cvt.f32.f16 a, h;",
                                          round_r="cvt.rn.f16.f32 h, r; cvt.f32.f16 r, h;"))
    _ROPE_BF16 = tl.constexpr(_ROPE.format(round_a="cvt.rn.bf16.f32 h, a; cvt.f32.bf16 a, h;",
                                           round_r="cvt.rn.bf16.f32 h, r; cvt.f32.bf16 r, h;"))
    _ROPE_F32 = tl.constexpr(_ROPE.format(round_a="", round_r=""))

    @triton.jit(noinline=True)
    def _combine_row(Acc, Mx, Sum, Out, pid, n_splits, D: tl.constexpr, BLOCK_S: tl.constexpr,
                     CHUNK: tl.constexpr):
        """Out[pid] from the partials of query row `pid` (row * heads + head), in a fixed order
        (all at once where BLOCK_S <= CHUNK, else CHUNK splits at a time in split order).
        The loads go to L2 (.cg): under fused_combine other programs wrote them just before. Not
        inlined: inlined after the keys loop of fp32 inputs, it took all 255 registers and spilled (sm_90)."""
        s = tl.arange(0, BLOCK_S)
        there = s < n_splits
        d = tl.arange(0, D)
        mx = tl.load(Mx + pid * n_splits + s, mask=there, other=float("-inf"), cache_modifier=".cg")
        sums = tl.load(Sum + pid * n_splits + s, mask=there, other=0.0, cache_modifier=".cg")
        if BLOCK_S <= CHUNK:  # every split's weighted values asked for with the rest: one round trip to L2
            part = tl.load(Acc + (pid * n_splits + s)[:, None] * D + d[None, :], mask=there[:, None], other=0.0,
                           cache_modifier=".cg")
        m = tl.max(mx, 0)
        w = tl.where(mx == float("-inf"), 0.0, tl.exp(mx - m))  # splits that attended nothing weigh 0
        total = tl.sum(sums * w, 0)
        if BLOCK_S <= CHUNK:
            acc = tl.sum(part * w[:, None], 0)
        else:
            c = tl.arange(0, CHUNK)
            acc = tl.zeros([D], tl.float32)
            for lo in range(0, n_splits, CHUNK):  # the weighted values a few splits at a time, in order
                idx = lo + c
                ok = idx < n_splits
                mc = tl.load(Mx + pid * n_splits + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
                wc = tl.where(mc == float("-inf"), 0.0, tl.exp(mc - m))
                part = tl.load(Acc + (pid * n_splits + idx)[:, None] * D + d[None, :], mask=ok[:, None],
                               other=0.0, cache_modifier=".cg")
                acc += tl.sum(part * wc[:, None], 0)
        tl.store(Out + pid * D + d, (acc / total).to(Out.dtype.element_ty))

    @triton.jit
    def _query(Q, C, S, b, heads, g, d, sq_b, sq_h, sc_b, ss_b, ok, GROUP: tl.constexpr, D: tl.constexpr,
               ROTARY: tl.constexpr, EAGER: tl.constexpr, PTX: tl.constexpr):
        """The query heads `heads` of row `b` [BLOCK_G, D] (rows past GROUP, or where `ok` is
        false, zero); ROTARY: the query as given, rotated here by cos C and sin S (row b's, [D]) as
        transformers' apply_rotary_pos_emb does, q cos + rotate_half(q) sin, in fp32 and rounded
        to the query's dtype at the end, or (EAGER) after each multiplication and after the sum,
        as eager rounds them. PTX (compiled for a GPU, not in the interpreter): EAGER's products
        and sum in inline PTX with explicit rounding, which no compiler contracts into an FMA
        (Triton's `*` then `+` may become one: fma.rn.f16 rounds a product once, with the sum)."""
        at = Q + b * sq_b + heads[:, None] * sq_h
        keep = (g < GROUP)[:, None] & ok
        q = tl.load(at + d[None, :], mask=keep, other=0.0)
        if ROTARY:
            other = tl.load(at + ((d + D // 2) % D)[None, :], mask=keep, other=0.0).to(tl.float32)
            half = tl.where((d < D // 2)[None, :], -other, other)  # rotate_half(q): (-q[D/2:], q[:D/2])
            c = tl.load(C + b * sc_b + d).to(tl.float32)
            s = tl.load(S + b * ss_b + d).to(tl.float32)
            if EAGER and PTX:
                if q.dtype == tl.float16:
                    asm: tl.constexpr = _ROPE_F16
                elif q.dtype == tl.bfloat16:
                    asm: tl.constexpr = _ROPE_BF16
                else:
                    asm: tl.constexpr = _ROPE_F32
                q = tl.inline_asm_elementwise(asm, "=f,f,f,f,f", [q.to(tl.float32), c[None, :], half, s[None, :]],
                                              dtype=tl.float32, is_pure=True, pack=1).to(q.dtype)
            else:
                a = q.to(tl.float32) * c[None, :]
                r = half * s[None, :]
                if EAGER:
                    a = a.to(q.dtype).to(tl.float32)
                    r = r.to(q.dtype).to(tl.float32)
                q = (a + r).to(q.dtype)
        return q

    @triton.jit
    def _keys_block(q, k, v, add, m_i, l_i, acc, scale, DOT: tl.constexpr, PRECISION: tl.constexpr):
        """The online softmax's running max, sum and weighted values (m_i, l_i, acc) after a block
        of keys `k` and values `v` [BLOCK, D] with their additive mask `add` [BLOCK]."""
        if DOT:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK] in fp32
        else:
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2) * scale
        s = s + add.to(tl.float32)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing attended yet: no NaN
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
        return m_new, l_i, acc

    @triton.jit
    def _partial(Q, K, V, M, Acc, Mx, Sum,
                 sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l,
                 kv_heads, keys, per_split, n_splits, scale, Out, Count, C, S, sc_b, ss_b,
                 GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                 PRECISION: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr = False,
                 PREFETCH: tl.constexpr = False, COMBINE: tl.constexpr = False, BLOCK_S: tl.constexpr = 2,
                 CHUNK: tl.constexpr = 16, Q_WITH_KEYS: tl.constexpr = False, ROTARY: tl.constexpr = False,
                 EAGER: tl.constexpr = True, PTX: tl.constexpr = True, KN=None, VN=None, Pos=None, skn_b=0,
                 skn_h=0, svn_b=0, svn_h=0, cap=0, WRITE: tl.constexpr = False, LATE: tl.constexpr = False,
                 PRELOAD: tl.constexpr = False, POS_EARLY: tl.constexpr = False, CAUSAL: tl.constexpr = False):
        """The partials of split `program_id(1)` for the query heads of one row and kv head
        (`program_id(0)`); COMBINE: the last of that row and kv head's programs to finish (counted
        in Count[program_id(0)], which it sets back to 0 for the next launch) combines them into Out.
        WRITE: the step's new key KN (rotated here as the query is, ROTARY) and value VN [b, kv
        heads, D] are first written at column Pos[0] by the program whose split holds it (the
        last split's where it lies past the attended keys), which then reads them back with the
        rest of its keys (after a barrier: every thread's store before any thread's load); a column
        past the buffers' `cap` columns nowhere. PRELOAD (Config.preload): the split's first block
        of keys, values and mask read before the PDL wait (the launch passes it only where the
        kernel before wrote none of them: bench.pdl), and the written column read again after the
        write. POS_EARLY (Config.pos_early): Pos read before the PDL wait. CAUSAL (WRITE only): M
        unread, the keys attended those up to the new column (`attend`'s `causal`)."""
        pid = tl.program_id(0)  # row * kv_heads + kv head
        split = tl.program_id(1)
        b = pid // kv_heads
        kvh = pid % kv_heads
        start = split * per_split
        end = tl.minimum(start + per_split, keys)
        if WRITE & POS_EARLY:  # the new column's index before the PDL wait: no output of the kernel before
            new_col = tl.load(Pos)
        if PRELOAD:  # the split's first block of keys, values and mask: none is the kernel before's output
            # (the step's new key and value, which this kernel writes, are read again after the write)
            cols0 = start + tl.arange(0, BLOCK)
            inside0 = cols0 < end
            d0 = tl.arange(0, D)
            k0 = tl.load(K + b * sk_b + kvh * sk_h + cols0[:, None] * sk_l + d0[None, :], mask=inside0[:, None],
                         other=0.0)
            v0 = tl.load(V + b * sv_b + kvh * sv_h + cols0[:, None] * sv_l + d0[None, :], mask=inside0[:, None],
                         other=0.0)
            if not CAUSAL:
                add0 = tl.load(M + b * sm_b + cols0 * sm_l, mask=inside0, other=float("-inf"))
        if PDL:  # launched with programmatic dependent launch (bench.pdl): the kernel before wrote q (and,
            # without WRITE, the new key and value); the split's keys and values asked of L2 meanwhile
            # (PREFETCH: both buffers 16-byte aligned; the newest key and value among them, which the kernel
            # before or this one writes: a prefetch only warms L2, where that write lands whenever it comes;
            # nothing else is read before the wait but PRELOAD's block and POS_EARLY's Pos)
            if PREFETCH & (sk_l == D) & (sv_l == D) & (end > start):
                nbytes = ((end - start) * D * (K.dtype.element_ty.primitive_bitwidth // 8)).to(tl.int32)
                prefetch_l2(K + b * sk_b + kvh * sk_h + start * D, nbytes)
                prefetch_l2(V + b * sv_b + kvh * sv_h + start * D, nbytes)
            tl.extra.cuda.gdc_wait()
            if not LATE:  # (LATE, bench.pdl.LATE: after the keys loop)
                tl.extra.cuda.gdc_launch_dependents()
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        heads = kvh * GROUP + g  # the query heads reading this kv head (transformers' repeat_kv)
        if WRITE:
            if not POS_EARLY:
                new_col = tl.load(Pos)
            held = ((new_col >= start) & (new_col < end)) | ((split == n_splits - 1) & (new_col >= keys))
            if held & (new_col >= 0) & (new_col < cap):  # (a column past the buffers: written nowhere)
                # the new key as a one-head "query" of its kv head (row 0 of [BLOCK_G, D]), rotated as the query is
                kn = _query(KN, C, S, b, kvh + g, g, d, skn_b, skn_h, sc_b, ss_b, True, 1, D, ROTARY, EAGER, PTX)
                tl.store(K + b * sk_b + kvh * sk_h + new_col * sk_l + g[:, None] * 0 + d[None, :], kn,
                         mask=(g == 0)[:, None])
                tl.store(V + b * sv_b + kvh * sv_h + new_col * sv_l + d, tl.load(VN + b * svn_b + kvh * svn_h + d))
            tl.debug_barrier()  # every thread's stores before any thread's loads of the keys below
        if not Q_WITH_KEYS:
            q = _query(Q, C, S, b, heads, g, d, sq_b, sq_h, sc_b, ss_b, True, GROUP, D, ROTARY, EAGER, PTX)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        first = start
        stop = end  # the split's columns attended: under CAUSAL none past the new one (nor read in the loop)
        if CAUSAL:
            stop = tl.minimum(end, (new_col + 1).to(tl.int32))
        if PRELOAD:
            if WRITE:  # the column this program just wrote, read again (the other programs' loads are all masked off)
                again = (cols0 == new_col) & inside0
                k0 = tl.where(again[:, None], tl.load(K + b * sk_b + kvh * sk_h + cols0[:, None] * sk_l + d[None, :],
                                                      mask=again[:, None], other=0.0), k0)
                v0 = tl.where(again[:, None], tl.load(V + b * sv_b + kvh * sv_h + cols0[:, None] * sv_l + d[None, :],
                                                      mask=again[:, None], other=0.0), v0)
            if Q_WITH_KEYS:
                q = _query(Q, C, S, b, heads, g, d, sq_b, sq_h, sc_b, ss_b, True, GROUP, D, ROTARY, EAGER, PTX)
            if CAUSAL:
                add0 = tl.where(cols0 < stop, 0.0, float("-inf"))
            m_i, l_i, acc = _keys_block(q, k0, v0, add0, m_i, l_i, acc, scale, DOT, PRECISION)
            first = start + BLOCK
        for lo in range(first, stop, BLOCK):
            cols = lo + tl.arange(0, BLOCK)
            inside = cols < stop
            if Q_WITH_KEYS:  # (lo < stop: not loop-invariant to the compiler, so the load stays in the loop)
                q = _query(Q, C, S, b, heads, g, d, sq_b, sq_h, sc_b, ss_b, lo < stop, GROUP, D, ROTARY, EAGER, PTX)
            k = tl.load(K + b * sk_b + kvh * sk_h + cols[:, None] * sk_l + d[None, :], mask=inside[:, None],
                        other=0.0)
            if CAUSAL:  # the columns up to the new one: its causal mask, made here instead of read
                add = tl.where(inside, 0.0, float("-inf"))
            else:
                add = tl.load(M + b * sm_b + cols * sm_l, mask=inside, other=float("-inf"))
            v = tl.load(V + b * sv_b + kvh * sv_h + cols[:, None] * sv_l + d[None, :], mask=inside[:, None],
                        other=0.0)
            m_i, l_i, acc = _keys_block(q, k, v, add, m_i, l_i, acc, scale, DOT, PRECISION)
        if PDL and LATE:
            tl.extra.cuda.gdc_launch_dependents()
        row = (b * kv_heads * GROUP + heads) * n_splits + split  # [B * H, splits] partials
        keep = g < GROUP
        tl.store(Acc + row[:, None] * D + d[None, :], acc, mask=keep[:, None])
        tl.store(Mx + row, m_i, mask=keep)
        tl.store(Sum + row, l_i, mask=keep)
        if COMBINE:
            # every thread's stores issued before the count (a barrier), the count acquire-release at
            # GPU scope: the program that counts last sees every split's partials
            tl.debug_barrier()
            if tl.atomic_add(Count + pid, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
                tl.store(Count + pid, 0)
                for gi in range(GROUP):
                    _combine_row(Acc, Mx, Sum, Out, b * kv_heads * GROUP + kvh * GROUP + gi, n_splits, D,
                                 BLOCK_S, CHUNK)

    @triton.jit
    def _combine(Acc, Mx, Sum, Out, n_splits, D: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr,
                 PDL: tl.constexpr = False):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        _combine_row(Acc, Mx, Sum, Out, tl.program_id(0), n_splits, D, BLOCK_S, CHUNK)  # row * heads + head


def _programs(device: torch.device, per_sm: int) -> int:
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 4 * per_sm  # Triton's interpreter on the CPU (tests): a few splits


# Per device, the fused combine's counts (int32 zeros, each set back to zero by the launch that
# counted it): allocated outside any CUDA graph capture and never freed, since captured launches
# keep their address; one too small is replaced, the old one kept alive for the graphs holding it.
# Shared by every fused launch on the device, so two must never run at once (two streams): the
# engines launch them on one stream, one layer after another.
_COUNTS: dict[torch.device, list[torch.Tensor]] = {}


def _counts(device: torch.device, n: int) -> torch.Tensor | None:
    """A zeroed int32 tensor of at least `n` counts on `device`, or None while a capture is under
    way and none is large enough (the launch then combines by the second kernel)."""
    held = _COUNTS.setdefault(device, [])
    if held and held[-1].numel() >= n:
        return held[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    held.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
    return held[-1]


def launches(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
             scale: float, splits: tuple[int, int] | None = None, config: Config | None = None,
             cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
             eager_rounding: bool = True, new: tuple | None = None, causal: bool = False) -> tuple[list, torch.Tensor]:
    """([(kernel, grid, args, kwargs) of the launches: partial and combine, or the partial alone
    under fused_combine], output) for `attend`'s arguments (`config` default: the module's DEFAULT
    as it is at the call), its buffers allocated on q's device (the meta device gives what lab and
    tests compile for a GPU that is not here: bench.quant.triton_aot). `new`: as `attend`'s."""
    config = config or DEFAULT
    b, h, t, d = q.shape
    kvh, n = keys.shape[1], keys.shape[2]
    problem = "split-kv attention takes one query" if t != 1 else _shape_problem(h, kvh, d)
    if problem:
        raise ValueError(f"{problem}; got q {tuple(q.shape)}, keys {tuple(keys.shape)}")
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("split-kv attention needs keys and values contiguous in their last dimension")
    if q.stride(-1) != 1:  # (compiled code may hand over another layout; one query is a few KB)
        q = q.contiguous()
    if (cos is None) != (sin is None):
        raise ValueError("split-kv attention rotates the query by cos and sin: both or neither")
    rope = [q, q]  # (unread without cos and sin)
    if cos is not None:
        for r in (cos, sin):
            if (r.dim() not in (2, 3) or r.shape[0] not in (1, b) or r.shape[-1] != d
                    or r.dim() == 3 and r.shape[1] != 1 or r.dtype != q.dtype or r.device != q.device):
                raise ValueError(f"split-kv attention: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} ({cos.dtype}, "
                                 f"{sin.dtype}) are not one position's [1 or {b}, 1, {d}] in q's dtype ({q.dtype}) "
                                 f"and device")
        rope = [r.reshape(r.shape[0], d).contiguous() for r in (cos, sin)]  # [1 or b, d]
    written = _new_key_and_value(new, q, keys)
    group = h // kvh
    dot = config.dot or triton.next_power_of_2(group) * config.block * d > BROADCAST_REGISTERS * 32 * config.num_warps
    if causal and (not written or mask is not None):
        raise ValueError("split-kv attention makes a causal mask from the new column: it takes the new key and value "
                         "(`new`) and no mask")
    made_mask = mask is None and not causal
    if made_mask:
        mask = torch.zeros(1, n, dtype=q.dtype, device=q.device)
    m = keys[:1, 0, :, 0] if causal else mask.reshape(-1, mask.shape[-1])  # [1 or b, L] (causal: a view, unread)
    if m.shape[0] not in (1, b) or m.shape[1] != n:
        raise ValueError(f"split-kv attention: mask {tuple(mask.shape)} does not broadcast to ({b}, 1, 1, {n})")
    per, count = splits or splits_for(b, kvh, n, _programs(q.device, config.programs_per_sm), config.block)
    acc = torch.empty(b * h, count, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b * h, count, dtype=torch.float32, device=q.device)
    total = torch.empty(b * h, count, dtype=torch.float32, device=q.device)
    out = torch.empty(b, h, 1, d, dtype=q.dtype, device=q.device)
    counts = _counts(q.device, b * kvh) if config.fused_combine else None
    partial = (q, keys, values, m, acc, mx, total,
               q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
               values.stride(0), values.stride(1), values.stride(2), 0 if m.shape[0] == 1 else m.stride(0),
               m.stride(1), kvh, n, per, count, scale, out, acc if counts is None else counts,
               *rope, *(0 if r.shape[0] == 1 else r.stride(0) for r in rope))
    pdl = {"PDL": True, "launch_pdl": True} if pdl_enabled(q.device) else {}
    # the partial kernel's own PDL settings (the combine, short, lets the next kernel start at once)
    partial_pdl = {"PREFETCH": config.prefetch and keys.data_ptr() % 16 == 0 and values.data_ptr() % 16 == 0,
                   "LATE": bool(pdl_settings.LATE)} if pdl else {}
    # what it reads before its wait (with or without PDL): the first keys only where this kernel writes
    # the new column and the mask is the caller's (Config.preload: the zeros made above for None are
    # the launch just before), the column's index (Config.pos_early)
    early = {"PRELOAD": config.preload and (not pdl or bool(written) and not made_mask),
             "POS_EARLY": config.pos_early and bool(written)}
    combining = {"D": d, "BLOCK_S": max(2, triton.next_power_of_2(count)), "CHUNK": config.combine_chunk}
    calls = [(_partial, (b * kvh, count), partial,
              {**pdl, **partial_pdl, **early, **combining, "CAUSAL": causal, "GROUP": group, "BLOCK": config.block,
               "DOT": dot, "COMBINE": counts is not None, "num_warps": config.num_warps,
               # fp32 inputs (tests) keep 3 stages: at 2, ptxas spills 8 bytes in the two-kernel partial (sm_90)
               "num_stages": 3 if q.dtype == torch.float32 else config.num_stages,
               "Q_WITH_KEYS": config.q_with_keys, "ROTARY": cos is not None, "EAGER": eager_rounding,
               "PTX": q.device.type != "cpu",  # Triton's interpreter runs no PTX (the meta device: compiled ahead)
               "BLOCK_G": max(MIN_GROUP_ROWS if dot else 1, triton.next_power_of_2(group)),
               # fp32 inputs: fp32 products, not TF32's (the matmul path's, unless TF32 is on)
               "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32", **written})]
    if counts is None:
        calls.append((_combine, (b * h,), (acc, mx, total, out, count), {**pdl, **combining}))
    return calls, out


def _new_key_and_value(new: tuple | None, q: torch.Tensor, keys: torch.Tensor) -> dict:
    """The partial kernel's arguments for writing `new` = (key [b, kv heads, 1, d], value [b, kv
    heads, 1, d], column: a one-element integer tensor[, capacity]) into keys and values (none for
    None). keys and values may be views of the first columns of buffers of `capacity` columns
    (default: as many as the views have): a column past the attended ones is written there, one
    past the buffers nowhere. ValueError naming what does not fit."""
    if new is None:
        return {}
    k_new, v_new, pos, capacity = (*new, None)[:4]
    b, kvh, d = keys.shape[0], keys.shape[1], keys.shape[3]
    for name, t in (("key", k_new), ("value", v_new)):
        if (tuple(t.shape) != (b, kvh, 1, d) or t.stride(-1) != 1 or t.dtype != q.dtype or t.device != q.device):
            raise ValueError(f"split-kv attention: the new {name} {tuple(t.shape)} ({t.dtype}) is not [{b}, {kvh}, 1, "
                             f"{d}] in q's dtype ({q.dtype}) and device, contiguous in its last dimension")
    if pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64) or pos.device != q.device:
        raise ValueError(f"split-kv attention: the new column {tuple(pos.shape)} ({pos.dtype}) is not one integer on "
                         "q's device")
    return {"KN": k_new, "VN": v_new, "Pos": pos, "skn_b": k_new.stride(0), "skn_h": k_new.stride(1),
            "svn_b": v_new.stride(0), "svn_h": v_new.stride(1), "cap": capacity or keys.shape[2], "WRITE": True}


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
           scale: float, splits: tuple[int, int] | None = None, config: Config | None = None,
           cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
           eager_rounding: bool = True, new: tuple | None = None, causal: bool = False) -> torch.Tensor:
    """Attention of one query per row: q [b, h, 1, d], keys/values [b, kv_heads, L, d] (views of
    the buffers: any strides with the last dimension contiguous), `mask` additive, broadcastable
    to [b, 1, 1, L] (None: every key); -> [b, h, 1, d] in q's dtype. `splits` (keys per split,
    number of splits) overrides splits_for (tests); `config`: how the kernels are launched
    (`launches`' default). `cos`, `sin` (the query's position's, [1 or b, 1, d]): q is not rotated
    yet; the kernel rotates it as transformers' apply_rotary_pos_emb does, rounding as eager does
    (`eager_rounding`) or once. `new` = (key, value, column[, capacity]): the step's new key and
    value [b, kv_heads, 1, d] are written into keys and values at `column` (a one-element device
    tensor) first, the key rotated as q is where cos and sin are given (_new_key_and_value); under
    PDL with Config.pos_early, `column` must not be the output of the kernel launched just before.
    `causal` (with `new`, and no mask): every row attends to the columns up to the new one, the
    mask made in the kernel (Config.causal_mask)."""
    calls, out = launches(q, keys, values, mask, scale, splits, config, cos, sin, eager_rounding, new, causal)
    for kernel, grid, args, kwargs in calls:
        kernel[grid](*args, **kwargs)
    return out


@torch.library.custom_op("vlmbench::split_kv_attention", mutates_args=())
def split_kv_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                       scale: float, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                       eager_rounding: bool = True) -> torch.Tensor:
    """`attend` as one op compiled code calls as it is (CUDA-graph capturable: no host sync, its
    buffers from the caching allocator)."""
    return attend(q, keys, values, mask, scale, cos=cos, sin=sin, eager_rounding=eager_rounding)


def _output_like_q(q, *args, **kwargs):
    """Both ops' output as compiled code traces it: [b, h, 1, d] like q, contiguous."""
    return torch.empty_like(q, memory_format=torch.contiguous_format)


split_kv_attention.register_fake(_output_like_q)


@torch.library.custom_op("vlmbench::split_kv_attention_writing", mutates_args=("pair",))
def split_kv_attention_writing(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor,
                               pair: torch.Tensor, keys_end: int, mask: torch.Tensor | None, scale: float,
                               cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                               eager_rounding: bool = True, causal: bool = False) -> torch.Tensor:
    """`attend` over the first `keys_end` columns of a layer's key/value buffer `pair` [2, b,
    kv_heads, L, d] (bench.engines.kv_buffers' KVLayer.pair) after writing the step's new key
    and value at column `pos` (Config.write_kv): one op compiled code calls as it is, the
    buffer its mutated argument. `pos` must not be the output of the kernel launched just before
    (Config.pos_early reads it before the PDL wait): the engines' steps compute it at their start.
    `causal`: no mask, the columns up to `pos` attended (Config.causal_mask)."""
    return attend(q, pair[0, :, :, :keys_end], pair[1, :, :, :keys_end], mask, scale, cos=cos, sin=sin,
                  eager_rounding=eager_rounding, new=(k_new, v_new, pos, pair.shape[3]), causal=causal)


split_kv_attention_writing.register_fake(_output_like_q)


def reference(q, keys, values, mask, scale) -> torch.Tensor:
    """The same attention in fp32 torch ops (tests)."""
    kvh = keys.shape[1]
    group = q.shape[1] // kvh
    k = keys.float().repeat_interleave(group, 1)
    v = values.float().repeat_interleave(group, 1)
    s = (q.float() @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.float()
    return (torch.softmax(s, -1) @ v).to(q.dtype)

