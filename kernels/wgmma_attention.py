"""Decode attention over the packed KIVI store for wide head groups (more than 16 query heads
a kv head: multi-query models) on Hopper's warpgroup MMA (Gluon, wgmma).

One warpgroup (4 warps) a program. Grid (NUM_SPLITS, B * H): program (s, b * H + h) serves
all HG query heads of kv head h of slot b over split s of the slot's packed positions
[first, n_q[b]) in whole blocks of TB = 64 tokens, and writes one partial result at part
PART0 + s, as kernels/mma_attention.py does for narrow groups (the sinks, the ring and the
merge are kernels/decode_attention.py's). There each 16-head chunk of a wide group re-reads and
re-unpacks every code; here a block's codes are dequantized once, in registers, straight into
the A operands of both products, and the heads are the N of every MMA:

  scores  S[t, h] = sum_d K^[t, d] q[d, h]     A = K^ [TB, D] (warp w: tokens 16w ..),
                                               B = q [D, HN] in shared memory
  output  O^T[c, h] += sum_t V^[c, t] P[t, h]  A = V^ [D, TB] (warp w: channels 16w .., 64 + 16w ..),
                                               B = P [TB, HN], written to shared memory by the softmax

so a code costs the same whatever the group's width. HN (the heads rounded up to 8) is cut
into at most two chunks of power-of-2 widths (71 heads: 64 + 8), one accumulator pair each.

Dequantization is one fma.rn.bf16x2 a register: a code c masked in place at bit e of a half
word is the bf16 c * 2^(e - 133) (the low byte of a bf16 reads linearly, mma_attention.py), so
c * (s * 2^(133 - e - K0)) + m * 2^-K0 is bf16(c * s + m) * 2^-K0 with one rounding: the
reference's dequantized value, scaled by a power of two that keeps every operand normal
(K0 = 64). The scores and the output carry the 2^-K0 and are rescaled in fp32. bf16 only
(fp16's range has no room for the scaling); the packed layouts are quantize_kv.py's.

Per block: cp.async ring of STAGES blocks (codes, k_scale and k_min of the block's key groups,
v_scale and v_min rows); keys dequantized, the score MMAs issued, values dequantized while they
run; then softmax (lazy: the running max moves only when a block beats it by more than TAU,
log2) and P stored for the value MMAs, which run while the next block is dequantized; the
ring's refill is issued last, after the barriers that order every read of the stage it
overwrites. The loop runs as three loops over that body (a program's first block, the blocks
between, its last), so that the edge masks and the first block's start of the running max are
compiled out of the blocks between (ptxas would predicate them into every block). ptxas serializes the wgmmas (warning C7515: each MMA then waits for the one before)
unless the value accumulator kept in flight across the loop's back edge is
born from an MMA (_value_accumulator), never from plain zeroing instructions.

Adding a bit width: _extract's slot positions and CW (codes a half word's low byte holds),
the exponent e of a slot in _keys and _values, the copy tile widths in _copy_block and
_allocate_ring, and a TENSOR_CORE_CASES row in tests/test_kernels.py.
"""

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from kernels.mma_attention import (_PUBLIC_REINTERPRET, _async_load, _barrier, _bits_of, _exp2, _extract, _grid2,
                                   _pairs_to_operand, _slot_stores, _slots, async_copy)

TB = gl.constexpr(64)  # tokens a block: the M of the score MMA, 16 a warp
TAU = gl.constexpr(8.0)
K0 = gl.constexpr(64)  # the dequantized operands carry 2^-K0
STAGES = gl.constexpr(4)


@gluon.constexpr_function
def _chunk_widths(HG):
    """(N0, N1): HG rounded up to 8 as a power of 2 and a second, smaller one (0: none)."""
    n = (HG + 7) // 8 * 8
    n0 = 1 << (n.bit_length() - 1)
    rest = n - n0
    return n0, (1 << (rest - 1).bit_length()) if rest else 0


@gluon.constexpr_function
def _chunk0(HG):
    return _chunk_widths(HG)[0]


@gluon.constexpr_function
def _chunk1(HG):
    return _chunk_widths(HG)[1]


@gluon.constexpr_function
def _acc_layout(N):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])


@gluon.constexpr_function
def _a_layout(N):
    return gl.DotOperandLayout(operand_index=0, parent=_acc_layout(N), k_width=2)


@gluon.constexpr_function
def _linear_w(reg, lane, warp, shape):
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[], shape=shape)


@gluon.constexpr_function
def _key_words_layout(WPT, SPW):
    """[WPT, SPW, 4, TB]: (word of the lane, slot, lane quarter tig, token). Lanes: tig, token
    bits 0-2; registers: words, slots, token bit 3; warps: token bits 4-5 (the A operand's map
    of [tokens, channels], pairs aside)."""
    reg = _bits_of(WPT, 0, 4, 0) + _bits_of(SPW, 0, 4, 1) + [[0, 0, 0, 8]]
    lane = [[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4]]
    return _linear_w(reg, lane, [[0, 0, 0, 16], [0, 0, 0, 32]], [WPT, SPW, 4, TB])


@gluon.constexpr_function
def _value_words_layout(D, WPC, SPW):
    """[WPC, SPW, 8, TB / 2]: (word of the channel class, slot, class c % 8, token pair). Channel
    c = (word * SPW + slot) * 8 + c % 8; n = c // 8 has bit 0 in a register, bits 1-2 on the
    warps, bit 3 (D = 128) in a register. Lanes: pair bits 0-1, the class; registers: n bit 0,
    pair bits 2-4, n bit 3 (the A operand's map of [channels, tokens], pairs aside)."""
    log_spw = SPW.bit_length() - 1

    def n_bit(b):
        return [0, 1 << b, 0, 0] if b < log_spw else [1 << (b - log_spw), 0, 0, 0]

    reg = [n_bit(0), [0, 0, 0, 4], [0, 0, 0, 8], [0, 0, 0, 16]] + ([n_bit(3)] if D == 128 else [])
    lane = [[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 4, 0]]
    return _linear_w(reg, lane, [n_bit(1), n_bit(2)], [WPC, SPW, 8, TB // 2])


@gluon.constexpr_function
def _copy_layout(rows, cols):
    """A [rows, cols] 32-bit tile over 128 threads, up to 4 consecutive words a thread (16-byte
    copies), rows spread over the lanes and warps."""
    vec = min(4, cols)
    tc = min(32, cols // vec)
    return gl.BlockedLayout([1, vec], [32 // tc, tc], [4, 1], [1, 0])


@gluon.constexpr_function
def _plain(rank):
    return gl.SwizzledSharedLayout(1, 1, 1, list(range(rank))[::-1])


@gluon.jit
def _fma_bf16(x, s, m):
    """x * s + m on bf16 pairs with one rounding (fma.rn.bf16x2; x may be subnormal)."""
    return gl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [x, s, m], dtype=gl.bfloat16,
                                     is_pure=True, pack=2)


@gluon.jit
def _allocate_ring(D: gl.constexpr, G: gl.constexpr, BITS_K: gl.constexpr, BITS_V: gl.constexpr):
    """STAGES blocks of: key words [TB, D * BITS_K / 32], k_scale and k_min words [NGK, D / 2]
    (kappa order, one row a key group of the block), value words [TB / 2, D * BITS_V / 16],
    v_scale and v_min words [D / G, TB / 2] (a group's row of token pairs)."""
    NGK: gl.constexpr = TB // G if G < TB else 1
    return (gl.allocate_shared_memory(gl.int32, [STAGES, TB, D * BITS_K // 32], _plain(2)),
            gl.allocate_shared_memory(gl.int32, [STAGES, NGK, D // 2], _plain(2)),
            gl.allocate_shared_memory(gl.int32, [STAGES, NGK, D // 2], _plain(2)),
            gl.allocate_shared_memory(gl.int32, [STAGES, TB // 2, D * BITS_V // 16], _plain(2)),
            gl.allocate_shared_memory(gl.int32, [STAGES, D // G, TB // 2], _plain(2)),
            gl.allocate_shared_memory(gl.int32, [STAGES, D // G, TB // 2], _plain(2)))


@gluon.jit
def _copy_block(ring, stage, KP, KS, KM, VP, VS, VM, t0, L: gl.constexpr, D: gl.constexpr, G: gl.constexpr,
                BITS_K: gl.constexpr, BITS_V: gl.constexpr):
    """Start the copies of block t0 into `stage`, one commit group. k_scale and k_min go in the
    score product's K order kappa (kappa = 8j + 2 tig + u holds channel tig * D / 4 + 2j + u),
    as words of channel pairs."""
    NGK: gl.constexpr = TB // G if G < TB else 1
    WK: gl.constexpr = D * BITS_K // 32
    WV: gl.constexpr = D * BITS_V // 16
    t, w = _grid2(TB, WK, _copy_layout(TB, WK))
    _async_load(ring[0].index(stage), KP + (t0 + t) * WK + w)
    g, pair = _grid2(NGK, D // 2, _copy_layout(NGK, D // 2))  # pair p = kappa // 2 = 4j + tig
    word = ((t0 // G + g) * D + pair % 4 * (D // 4) + pair // 4 * 2) // 2
    _async_load(ring[1].index(stage), KS.to(gl.pointer_type(gl.int32)) + word)
    _async_load(ring[2].index(stage), KM.to(gl.pointer_type(gl.int32)) + word)
    p, w = _grid2(TB // 2, WV, _copy_layout(TB // 2, WV))
    _async_load(ring[3].index(stage), VP + (t0 // 2 + p) * WV + w)
    gv, p = _grid2(D // G, TB // 2, _copy_layout(D // G, TB // 2))
    row = (gv * L + t0) // 2 + p
    _async_load(ring[4].index(stage), VS.to(gl.pointer_type(gl.int32)) + row)
    _async_load(ring[5].index(stage), VM.to(gl.pointer_type(gl.int32)) + row)
    async_copy.commit_group()


@gluon.jit
def _as_bf16(words_smem, shape: gl.constexpr):
    """A shared int32 tile of bf16 pairs, read as bf16 [.., 2 x last]."""
    if _PUBLIC_REINTERPRET:
        return words_smem.reinterpret(gl.bfloat16, shape, _plain(len(shape)))
    return words_smem._reinterpret(gl.bfloat16, shape, _plain(len(shape)))


@gluon.jit
def _keys(ring, stage, D: gl.constexpr, G: gl.constexpr, BITS: gl.constexpr, N: gl.constexpr):
    """The block's dequantized keys K^ * 2^-K0 [TB, D] (K order kappa) as the scores' A operand."""
    WPT: gl.constexpr = D * BITS // 128
    SPW: gl.constexpr = 16 // BITS
    CW: gl.constexpr = 8 // BITS  # codes in the low byte of a half word
    NGK: gl.constexpr = TB // G if G < TB else 1
    XL: gl.constexpr = _key_words_layout(WPT, SPW)
    kw = ring[0].index(stage).reshape([TB, 4, WPT]).permute((2, 1, 0)).load(gl.SliceLayout(1, XL))
    k = _slots(SPW, XL)
    x = _extract(gl.expand_dims(kw, 1), k, BITS, CW)  # [WPT, SPW, 4, TB]
    x = gl.reshape(x, [D // 2, TB])  # pair index (w * SPW + k) * 4 + tig = kappa // 2
    x = gl.convert_layout(gl.permute(_pairs_to_operand(x, D, TB, True, gl.bfloat16), (1, 0)), _a_layout(N),
                          assert_trivial=True)
    x3 = gl.reshape(x, [NGK, TB // NGK, D])
    SL: gl.constexpr = gl.SliceLayout(1, x3.type.layout)
    scale = _as_bf16(ring[1].index(stage), [NGK, D]).load(SL)
    k_min = _as_bf16(ring[2].index(stage), [NGK, D]).load(SL)
    # the exponent of the slot holding kappa: j = kappa // 8 is word * SPW + slot
    kappa = gl.arange(0, D, layout=gl.SliceLayout(0, SL))
    e = kappa // 8 % SPW % CW * BITS
    scale = scale * gl.expand_dims(_pow2f(133 - K0 - e).to(gl.bfloat16), 0)  # exact: powers of two
    k_min = (k_min.to(gl.float32) * _exp2(-K0)).to(gl.bfloat16)
    x3 = _fma_bf16(x3, gl.expand_dims(scale, 1), gl.expand_dims(k_min, 1))
    return gl.convert_layout(gl.reshape(x3, [TB, D]), _a_layout(N), assert_trivial=True)


@gluon.jit
def _values(ring, stage, t0, q_end, EDGE: gl.constexpr, D: gl.constexpr, G: gl.constexpr, BITS: gl.constexpr,
            N: gl.constexpr):
    """The block's dequantized values V^ * 2^-K0 [D, TB] (channels in natural order) as the A
    operand of the value product; tokens from q_end on are zero (their store may hold anything)."""
    WPC: gl.constexpr = D * BITS // 128
    SPW: gl.constexpr = 16 // BITS
    CW: gl.constexpr = 8 // BITS
    NGV: gl.constexpr = D // G
    XL: gl.constexpr = _value_words_layout(D, WPC, SPW)
    vw = ring[3].index(stage).reshape([TB // 2, 8, WPC]).permute((2, 1, 0)).load(gl.SliceLayout(1, XL))
    k = _slots(SPW, XL)
    x = _extract(gl.expand_dims(vw, 1), k, BITS, CW)  # [WPC, SPW, 8, TB / 2]
    x = gl.reshape(x, [D, TB // 2])  # channel (w * SPW + k) * 8 + c % 8
    x = gl.convert_layout(_pairs_to_operand(x, D, TB, False, gl.bfloat16), _a_layout(N), assert_trivial=True)
    x3 = gl.reshape(x, [NGV, G, TB])
    SL: gl.constexpr = gl.SliceLayout(1, x3.type.layout)
    scale = _as_bf16(ring[4].index(stage), [NGV, TB]).load(SL)
    v_min = _as_bf16(ring[5].index(stage), [NGV, TB]).load(SL)
    tok = gl.expand_dims(gl.arange(0, TB, layout=gl.SliceLayout(0, SL)), 0)  # [1, TB]
    live = t0 + tok < q_end
    if EDGE:
        scale = gl.where(live, scale, 0.0)
        v_min = gl.where(live, v_min, 0.0)
    # the exponent of channel c's slot: c // 8 is word * SPW + slot
    c = gl.arange(0, G, layout=gl.SliceLayout(0, gl.SliceLayout(2, x3.type.layout)))
    gv = gl.arange(0, NGV, layout=gl.SliceLayout(1, gl.SliceLayout(2, x3.type.layout)))
    e = (gl.expand_dims(gv, 1) * G + gl.expand_dims(c, 0)) // 8 % SPW % CW * BITS  # [NGV, G]
    scale3 = gl.expand_dims(scale, 1) * gl.expand_dims(_pow2f(133 - K0 - e).to(gl.bfloat16), 2)
    v_min3 = gl.expand_dims((v_min.to(gl.float32) * _exp2(-K0)).to(gl.bfloat16), 1)
    x3 = _fma_bf16(x3, scale3, v_min3)
    return gl.convert_layout(gl.reshape(x3, [D, TB]), _a_layout(N), assert_trivial=True)


@gluon.jit
def _pow2f(e):
    """Exact 2^e as fp32 for an integer tensor e in the normal range."""
    return ((e + 127) << 23).to(gl.float32, bitcast=True)


@gluon.jit
def _q_to_shared(Q, q_row0, stride_qh, head0, HG, N: gl.constexpr, D: gl.constexpr):
    """q rows head0 .. head0 + N - 1 of the group (zero past HG) as a shared [N, D] tile, the
    channels in kappa order: the scores' B operand, K-major."""
    h, kappa = _grid2(N, D, gl.BlockedLayout([1, 2], [4, 8], [4, 1], [1, 0]))
    ch = kappa // 2 % 4 * (D // 4) + kappa // 8 * 2 + kappa % 2
    q = gl.load(Q + q_row0 + (head0 + h) * stride_qh + ch, mask=head0 + h < HG, other=0.0)
    return gl.allocate_shared_memory(gl.bfloat16, [N, D], gl.NVMMASharedLayout.get_default_for([N, D], gl.bfloat16), q)


@gluon.jit
def _p_buffer(N: gl.constexpr):
    """P^T [N, TB] bf16 in shared memory, zeroed: the value MMAs' B operand (K-major)."""
    zeros = gl.zeros([N, TB], gl.bfloat16, gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0]))
    return gl.allocate_shared_memory(gl.bfloat16, [N, TB], gl.NVMMASharedLayout.get_default_for([N, TB], gl.bfloat16),
                                     zeros)


@gluon.jit
def _value_accumulator(p_smem, D: gl.constexpr, N: gl.constexpr):
    """O^T [D, N] = 0 as an accumulator in flight, made by a value MMA over the zeroed P: an
    accumulator that plain instructions zero and the loop then keeps in flight across its back
    edge makes ptxas serialize every wgmma of the kernel (C7515)."""
    a = gl.zeros([D, TB], gl.bfloat16, _a_layout(N))
    return warpgroup_mma(a, p_smem.permute((1, 0)), gl.zeros([D, N], gl.float32, _acc_layout(N)), use_acc=False,
                         is_async=True)


@gluon.jit
def _phase_blocks(phase: gl.constexpr, n_blocks):
    """The blocks [lo, hi) of the main loop's phase: 0 the first block, 1 those between the first
    and the last, 2 the last (none when the first is the last)."""
    inner_end = gl.maximum(n_blocks - 1, 1)
    if phase == 0:
        lo, hi = 0, 1
    elif phase == 1:
        lo, hi = 1, inner_end
    else:
        lo, hi = inner_end, n_blocks
    return lo, hi


@gluon.jit
def _logits(s, m_i, code_scale, valid, EDGE: gl.constexpr, FIRST: gl.constexpr):
    """A block's logits less the running max, d = s * code_scale - m (log2 units; -inf where not
    valid, checked only in a block at an edge; m = 0 in a program's first block, where m_i is
    not yet a max), and each token's largest d [TB]."""
    m = gl.zeros_like(m_i) if FIRST else m_i
    d = s * code_scale - gl.expand_dims(m, 0)
    if EDGE:
        d = gl.where(valid, d, float("-inf"))
    return d, m, _row_max(d)


@gluon.jit
def _row_max(d):
    """Each token's largest logit [TB] of d [TB, N]: the heads halved by independent maxima while
    a thread holds several columns (a plain reduction is one dependent chain through them)."""
    N: gl.constexpr = d.shape[1]
    if N >= 64:
        d = gl.max(gl.reshape(d, [TB, 2, N // 2]), 1)
    if N >= 32:
        d = gl.max(gl.reshape(d, [TB, 2, d.shape[1] // 2]), 1)
    if N >= 16:
        d = gl.max(gl.reshape(d, [TB, 2, d.shape[1] // 2]), 1)
    return gl.max(d, 1)


@gluon.jit
def _row_pairs(p):
    """[TB, N] in the accumulator's map -> [TB / 16, 8, N]: the sum of each thread's two rows
    (tokens g and g + 8 of its warp's 16), so that the softmax denominators take half the
    registers."""
    N: gl.constexpr = p.shape[1]
    return gl.sum(gl.reshape(p, [TB // 16, 2, 8, N]), 1)


@gluon.jit
def _move_max(d, m, m_i, l_acc, o_acc):
    """Raise the running max m_i to the block's (d = logits - m): d, the accumulators and m_i
    follow (m_i starts at -1e30, so the first block zeroes the empty accumulators)."""
    m_new = gl.maximum(m_i, gl.max(d, 0) + m)
    alpha = gl.exp2(m_i - m_new)
    heads: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, l_acc.type.layout))
    l_acc = l_acc * gl.expand_dims(gl.expand_dims(gl.convert_layout(alpha, heads), 0), 0)
    return d + gl.expand_dims(m - m_new, 0), m_new, l_acc, o_acc * gl.expand_dims(alpha, 0)


@gluon.jit
def _store_chunk(O_PART, LSE_PART, row0, HG, head0, part, NUM_PARTS: gl.constexpr, m_i, l_acc, o_acc,
                 N: gl.constexpr, D: gl.constexpr):
    """o[h, c] = O^T[c, h] * 2^K0 / l[h] and log2-sum-exp m + log2 l, heads head0 .. below HG."""
    ACC: gl.constexpr = _acc_layout(N)
    l_i = gl.convert_layout(gl.sum(gl.sum(l_acc, 0), 0), gl.SliceLayout(0, ACC))
    heads = head0 + gl.arange(0, N, layout=gl.SliceLayout(0, ACC))
    rows = (row0 + heads) * NUM_PARTS + part
    gl.store(LSE_PART + rows, m_i + gl.log2(l_i), mask=heads < HG)
    c, _ = _grid2(D, N, ACC)
    o = o_acc * gl.expand_dims(_exp2(K0) / l_i, 0)
    gl.store(O_PART + gl.expand_dims(rows, 0) * D + c, o, mask=gl.expand_dims(heads < HG, 0))


@gluon.jit
def _wgmma_kernel(
    Q, K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN, LENGTHS, N_QUANTIZED, O_PART, LSE_PART,
    stride_qb, stride_qh, qk_scale, NUM_SPLITS,
    H: gl.constexpr, HG: gl.constexpr, L: gl.constexpr, S: gl.constexpr, W: gl.constexpr, D: gl.constexpr,
    G: gl.constexpr, BITS_K: gl.constexpr, BITS_V: gl.constexpr, NUM_PARTS: gl.constexpr, PART0: gl.constexpr,
):
    gl.static_assert(G % 16 == 0 and D % G == 0, "a warp's 16 tokens lie in one key group")
    gl.static_assert((BITS_K == 2 or BITS_K == 4) and (BITS_V == 2 or BITS_V == 4), "2- or 4-bit codes")
    gl.static_assert(D == 64 or D == 128, "head_dim 64 or 128")
    N0: gl.constexpr = _chunk0(HG)
    N1: gl.constexpr = _chunk1(HG)
    ACC0: gl.constexpr = _acc_layout(N0)
    ACC1: gl.constexpr = _acc_layout(N1 if N1 > 0 else 8)

    split = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_q = gl.load(N_QUANTIZED + b)
    lo = gl.maximum(gl.load(LENGTHS + b) - W, 0)
    first = gl.minimum(lo // TB * TB, n_q)
    split_len = gl.cdiv(gl.cdiv(n_q - first, NUM_SPLITS), TB) * TB
    start = first + split * split_len
    q_end = gl.minimum(start + split_len, n_q)
    row0 = b * (H * HG) + h * HG  # the group's first query head
    part = PART0 + split
    if start >= q_end:
        heads = gl.arange(0, N0, layout=gl.SliceLayout(0, ACC0))
        gl.store(LSE_PART + (row0 + heads) * NUM_PARTS + part, gl.full([N0], float("-inf"), gl.float32,
                 gl.SliceLayout(0, ACC0)), mask=heads < HG)
        if N1 > 0:
            heads1 = N0 + gl.arange(0, N1, layout=gl.SliceLayout(0, ACC1))
            gl.store(LSE_PART + (row0 + heads1) * NUM_PARTS + part, gl.full([N1], float("-inf"), gl.float32,
                     gl.SliceLayout(0, ACC1)), mask=heads1 < HG)
        return

    bh = pid_bh.to(gl.int64)
    KP, KS, KM, VP, VS, VM = _slot_stores(K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN, bh, L, D, G, BITS_K,
                                          BITS_V)
    q_row0 = b * stride_qb + (h * HG) * stride_qh
    q0 = _q_to_shared(Q, q_row0, stride_qh, 0, HG, N0, D)
    p0_smem = _p_buffer(N0)
    m0 = gl.full([N0], -1e30, gl.float32, gl.SliceLayout(0, ACC0))
    l0 = _row_pairs(gl.zeros([TB, N0], gl.float32, ACC0))  # softmax denominators, row pairs summed
    if N1 > 0:
        q1 = _q_to_shared(Q, q_row0, stride_qh, N0, HG, N1, D)
        p1_smem = _p_buffer(N1)
        m1 = gl.full([N1], -1e30, gl.float32, gl.SliceLayout(0, ACC1))
        l1 = _row_pairs(gl.zeros([TB, N1], gl.float32, ACC1))
    fence_async_shared()
    _barrier()  # q and the zeroed P are written by every thread before an MMA reads them
    o0 = _value_accumulator(p0_smem, D, N0)
    if N1 > 0:
        o1 = _value_accumulator(p1_smem, D, N1)
    code_scale = qk_scale * _exp2(K0)
    first_valid = gl.maximum(lo, S)
    ring = _allocate_ring(D, G, BITS_K, BITS_V)
    last = q_end - 1 - (q_end - 1 - start) % TB  # the last block's first token
    for i in gl.static_range(STAGES - 1):
        _copy_block(ring, i, KP, KS, KM, VP, VS, VM, gl.minimum(start + i * TB, last), L, D, G, BITS_K, BITS_V)
    tok = gl.expand_dims(gl.arange(0, TB, layout=gl.SliceLayout(1, ACC0)), 1)  # [TB, 1]
    tok1 = gl.expand_dims(gl.arange(0, TB, layout=gl.SliceLayout(1, ACC1)), 1)
    n_blocks = gl.cdiv(q_end - start, TB)
    # three loops: only a program's first and last blocks (phases 0 and 2) may hold tokens before
    # the window or past the split (masked), and only the first has no running max yet
    for phase in gl.static_range(3):
        lo_it, hi_it = _phase_blocks(phase, n_blocks)
        for it in range(lo_it, hi_it):
            t0 = start + it * TB
            stage = it % STAGES
            async_copy.wait_group(STAGES - 2)  # block t0 has landed
            _barrier()  # ... for every thread
            a_k = _keys(ring, stage, D, G, BITS_K, N0)
            s0 = warpgroup_mma(a_k, q0.permute((1, 0)), gl.zeros([TB, N0], gl.float32, ACC0), use_acc=False,
                               is_async=True)
            if N1 > 0:
                s1 = warpgroup_mma(gl.convert_layout(a_k, _a_layout(N1), assert_trivial=True), q1.permute((1, 0)),
                                   gl.zeros([TB, N1], gl.float32, ACC1), use_acc=False, is_async=True)
            a_v = _values(ring, stage, t0, q_end, phase != 1, D, G, BITS_V, N0)
            if N1 > 0:
                s0, s1, o0, o1 = warpgroup_mma_wait(0, deps=(s0, s1, o0, o1))
            else:
                s0, o0 = warpgroup_mma_wait(0, deps=(s0, o0))
            _barrier()  # every warp's share of the last value MMAs has read P before P is rewritten
            d0, mb0, rise = _logits(s0, m0, code_scale, (t0 + tok >= first_valid) & (t0 + tok < q_end), phase != 1,
                                    phase == 0)
            if N1 > 0:
                d1, mb1, rise1 = _logits(s1, m1, code_scale, (t0 + tok1 >= first_valid) & (t0 + tok1 < q_end),
                                         phase != 1, phase == 0)
                rise = gl.maximum(rise, gl.convert_layout(rise1, rise.type.layout, assert_trivial=True))
            # the first block, or one that beats the running max by more than TAU
            if (phase == 0) | (gl.max(rise, 0) > TAU):
                d0, m0, l0, o0 = _move_max(d0, mb0, m0, l0, o0)
                if N1 > 0:
                    d1, m1, l1, o1 = _move_max(d1, mb1, m1, l1, o1)
            p0 = gl.exp2(d0)
            l0 += _row_pairs(p0)
            p0_smem.store(gl.permute(p0.to(gl.bfloat16), (1, 0)))
            if N1 > 0:
                p1 = gl.exp2(d1)
                l1 += _row_pairs(p1)
                p1_smem.store(gl.permute(p1.to(gl.bfloat16), (1, 0)))
            fence_async_shared()
            _barrier()  # every warp's P is written before the value MMAs read it
            o0 = warpgroup_mma(a_v, p0_smem.permute((1, 0)), o0, is_async=True)
            if N1 > 0:
                o1 = warpgroup_mma(gl.convert_layout(a_v, _a_layout(N1), assert_trivial=True),
                                   p1_smem.permute((1, 0)), o1, is_async=True)
            # refill the stage of the block before this one: every thread's reads of it came before the
            # barriers above (here, not at the loop's top, so that no further barrier is needed)
            _copy_block(ring, (it + STAGES - 1) % STAGES, KP, KS, KM, VP, VS, VM,
                        gl.minimum(t0 + (STAGES - 1) * TB, last), L, D, G, BITS_K, BITS_V)
    async_copy.wait_group(0)  # no copy outlives the program: its shared memory passes to the next one
    if N1 > 0:
        o0, o1 = warpgroup_mma_wait(0, deps=(o0, o1))
        _store_chunk(O_PART, LSE_PART, row0, HG, N0, part, NUM_PARTS, m1, l1, o1, N1, D)
    else:
        o0 = warpgroup_mma_wait(0, deps=(o0,))
    _store_chunk(O_PART, LSE_PART, row0, HG, 0, part, NUM_PARTS, m0, l0, o0, N0, D)


def fits(heads_per_kv: int, head_dim: int) -> bool:
    """More than 16 query heads a kv head, and at most 96 (head_dim 64) or 64 (head_dim 128)
    once padded: the accumulators of both products live in a thread's 255 registers (sm_90,
    Triton 3.6: 72 heads at 64 and 32 at 128 spill nothing; 96 at 64 and 48 at 128 spill a few
    dozen bytes, and 48 at 128 still ran faster than kernels/mma_attention.py on an H100)."""
    return 16 < heads_per_kv and sum(_chunk_widths(heads_per_kv)) <= (96 if head_dim == 64 else 64)


def supports(q: Tensor, bits_k: int, bits_v: int, heads_per_kv: int) -> bool:
    """Whether this kernel serves the call: a Hopper GPU, bf16, 2- or 4-bit codes, and fits()."""
    return (q.is_cuda and q.dtype == torch.bfloat16 and bits_k in (2, 4) and bits_v in (2, 4)
            and fits(heads_per_kv, q.shape[-1]) and torch.cuda.get_device_capability(q.device)[0] == 9)


PROGRAMS_PER_SM = 2  # by registers: ~240 a thread, 128 threads


def default_splits(programs: int, length: int, sms: int) -> int:
    """Splits of each slot's packed positions for `programs` (slot, kv head) pairs over a store of
    `length` positions: the count that minimizes waves of resident programs x (blocks a program
    + 1, its prologue)."""
    blocks = triton.cdiv(length, TB.value)
    cost = lambda s: triton.cdiv(programs * s, PROGRAMS_PER_SM * sms) * (triton.cdiv(blocks, s) + 1)
    return min(range(1, 65), key=cost)


def packed_attention(q: Tensor, k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor,
                     v_scale: Tensor, v_min: Tensor, lengths: Tensor, n_quantized: Tensor, o_part: Tensor,
                     lse_part: Tensor, bits_k: int, bits_v: int, group_size: int, n_sink: int, window: int,
                     qk_scale: float, num_splits: int, part0: int) -> None:
    """As mma_attention.packed_attention: the partials of the packed positions at parts
    part0 .. part0 + num_splits - 1."""
    B, Hq, D = q.shape
    H, L = k_packed.shape[1], k_packed.shape[2]
    _wgmma_kernel[(num_splits, B * H)](
        q, k_packed, k_scale, k_min, v_packed, v_scale, v_min, lengths, n_quantized, o_part, lse_part,
        q.stride(0), q.stride(1), qk_scale, num_splits,
        H=H, HG=Hq // H, L=L, S=n_sink, W=window, D=D, G=group_size, BITS_K=bits_k, BITS_V=bits_v,
        NUM_PARTS=o_part.shape[2], PART0=part0, num_warps=4,
    )
