"""Decode attention over the packed KIVI store on the tensor cores (Gluon, mma.sync m16n8k16).

One warp a program. Grid (NUM_SPLITS * NUM_CHUNKS, B * H): program (s * NUM_CHUNKS + c, b * H + h)
serves query heads c*16 .. c*16+15 of kv head h of slot b (the heads h*HG + ..., HN = 8 or 16 of
them: the N of every MMA; heads past HG run on zero queries and are not stored) over split s
of the slot's packed positions [lo, n_q[b]) cut into NUM_SPLITS runs of whole T = 32 token
blocks (a block lies in one key group: G is a multiple of T), so the work follows each slot's
live length; lo is 0, or with a sliding window of W positions the block of max(0, length - W). It
writes one partial result (normalized output and log2-sum-exp, -inf when it has no tokens) at
part PART0 + s; the sinks, the ring and the merge are kernels/decode_attention.py's.

A 2- or 4-bit code c whose bits are masked into the low bits of an otherwise zero 16-bit
float is exactly c * 2^(e - EB) (EB = 133 for bf16, 24 for fp16; e its bit offset): the low 8
bits of a bf16 (11 of an fp16) read linearly, as the mantissa of a subnormal or, with the
exponent's lowest bit, of the first normal binade, whose spacing is the same. A word gives two
such values, its two halves, with one LOP3: that pair is one 32-bit MMA operand register. The
store's packed layouts (quantize_kv.py) put the pairs where the MMA fragments want them, so
codes go from memory to the tensor cores with a shift and a mask:

  scores  S[t, h] = sum_d code_k[t, d] * Qs[d, h] + sum_d k_min[g, d] * q[d, h]
      codes as the A operand [T, D] (rows = tokens), Qs = q * k_scale[g] * 2^(KF - e(d)) as B
      [D, HN] (columns = query heads, per key group g); the min terms of 16 key groups are one
      MMA of their k_min rows (A) against q (B, kept in shared memory), made once every 16
      groups into a shared [16, HN] table of which a block reads one row.
  output  o^T[c, h] = sum_t code_v[c, t] * (p * v_scale[gv, t])[t, h] + sum_t v_min[gv, t] p[t, h]
      value codes as A [G, T] per channel group gv (rows = channels), p * v_scale as B
      [T, HN]: p leaves the score accumulator [T, HN] as 16-bit floats, each 8 x 8 tile
      transposed in registers (movmatrix) into the B operand's map; the min term is an MMA with
      the groups as rows; 2^(EB - e(c)) rescales each output channel.
The MMA K order of the scores is a permutation of the channels (kappa = 8j + 2 tig + u holds
channel tig * D / 4 + 2j + u): each lane's quarter of the channels is contiguous in memory.
Softmax is lazy: the running max moves only when a block beats it by more than TAU (log2),
so p <= 2^TAU and the accumulators are rarely rescaled; p carries 2^KV so that p * v_scale
stays a normal float. Blocks stream through a shared-memory ring of STAGES blocks (cp.async):
block t0 + (STAGES - 1) * T is in flight while block t0 is computed, and the scores of block
t0 + T are computed in the same iteration (a software pipeline of two blocks: the running
max moves before a block's values are weighed).

Layouts: every register tensor has an explicit layout (linear layouts spelled out below, or
the mma.sync operand layouts), chosen so that the words a lane loads are, after the shift
and mask, exactly its operand fragments; each such step is a convert_layout with
assert_trivial=True, so a layout that would need data movement fails to compile.
Launch heuristics (splits, one warp, the register cap, residency) live in default_splits(),
register_cap(), programs_per_sm() and packed_attention().

Adding a bit width b (a code must fit the linear low bits: b <= 8 for bf16):
  1. quantize_kv.SUPPORTED_BITS and the pair packing there hold it already if 16 % b == 0;
  2. here, allow b in the static_assert and in supports(); _extract's window CW = LINEAR // b
     and the slot count SPW = 16 // b follow, as do the exponents e of the rescaling;
  3. kernels/quantize.py and kernels/decode_attention.py are generic in b (check their
     static shapes: D * b / 128 words a lane);
  4. add cases to tests/test_kernels.py (TENSOR_CORE_CASES) and run scripts/check_gpu.py;
     benchmarks/sass_loop.py counts the new loop's instructions offline.
"""

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

# Names that changed after Triton 3.6 (torch 2.11's): the copy into shared memory, the CTA
# barrier and the reinterpretation of a shared buffer (a method, so chosen by a constexpr flag).
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
_PUBLIC_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))

T = gl.constexpr(32)  # tokens a block
HM = gl.constexpr(16)  # query heads a program serves at most; the rows of an MMA
TAU = gl.constexpr(8.0)
STAGES = gl.constexpr(4)  # blocks in flight in the shared-memory ring


@gluon.constexpr_function
def _log2(n):
    return n.bit_length() - 1


@gluon.constexpr_function
def _bits_of(n, offset, rank, dim):
    """Linear-layout bases that put the log2(n) bits of one dimension on one hardware axis."""
    return [[(1 << (b + offset)) if i == dim else 0 for i in range(rank)] for b in range(_log2(n))]


@gluon.constexpr_function
def _exp2(n):
    return 2.0**n


@gluon.constexpr_function
def _linear(reg, lane, shape):
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=[], block_bases=[], shape=shape)


MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
OP_A = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA.value, k_width=2))
OP_B = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA.value, k_width=2))


@gluon.constexpr_function
def _key_words_layout(WPT, SPW):
    """[WPT, SPW, 4, T]: (word of the lane, slot, lane's quarter tig, token). Lanes: tig, then
    token bits 0-2; registers: words, slots, token bits 3-4 (the A operand's map of [tokens,
    channels], pairs aside)."""
    reg = _bits_of(WPT, 0, 4, 0) + _bits_of(SPW, 0, 4, 1) + [[0, 0, 0, 8], [0, 0, 0, 16]]
    lane = [[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4]]
    return _linear(reg, lane, [WPT, SPW, 4, T])


@gluon.constexpr_function
def _value_words_layout(WPG, SPW):
    """[WPG, SPW, 8, T / 2]: (word of the channel class, slot, channel class c % 8, token pair).
    Lanes: pair bits 0-1, then the class; registers: words, slots, pair bits 2-3 (the A
    operand's map of [channels, tokens], pairs aside)."""
    reg = _bits_of(WPG, 0, 4, 0) + _bits_of(SPW, 0, 4, 1) + [[0, 0, 0, 4], [0, 0, 0, 8]]
    lane = [[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 4, 0]]
    return _linear(reg, lane, [WPG, SPW, 8, T // 2])


@gluon.constexpr_function
def _quarters_layout(D):
    """[4, D / 4]: lane quarter tig holds channels tig * D / 4 .. in its registers (16-byte
    loads); the 8 lanes of a quarter hold copies."""
    return _linear(_bits_of(D // 4, 0, 2, 1), [[1, 0], [2, 0], [0, 0], [0, 0], [0, 0]], [4, D // 4])


@gluon.constexpr_function
def _token_pairs_layout(ROWS, ROWS_ON_LANES):
    """[ROWS, 4, 4] words (row, tig, i) of a block's row of v_scale or v_min: word tig + 4 i
    holds tokens 2 tig + 8 i and the next, the k pairs a lane holds of an MMA operand whose K
    is the block's tokens. ROWS_ON_LANES: lane (g, tig) holds rows g and g + 8 (the A operand's
    rows, ROWS = 16); else every lane holds all rows (copies across g: the B operand's K)."""
    reg = [[0, 0, 1], [0, 0, 2]]
    tig = [[0, 1, 0], [0, 2, 0]]
    if ROWS_ON_LANES:
        return _linear(reg + [[8, 0, 0]], tig + [[1, 0, 0], [2, 0, 0], [4, 0, 0]], [ROWS, 4, 4])
    return _linear(reg + _bits_of(ROWS, 0, 3, 0), tig + [[0, 0, 0]] * 3, [ROWS, 4, 4])


@gluon.jit
def _pow2(e):
    """Exact 2^e as fp32 for an integer tensor e in the normal range."""
    return ((e + 127) << 23).to(gl.float32, bitcast=True)


@gluon.jit
def _grid2(N0: gl.constexpr, N1: gl.constexpr, layout: gl.constexpr):
    i0 = gl.arange(0, N0, layout=gl.SliceLayout(1, layout))
    i1 = gl.arange(0, N1, layout=gl.SliceLayout(0, layout))
    return gl.expand_dims(i0, 1), gl.expand_dims(i1, 0)


@gluon.jit
def _grid3(N0: gl.constexpr, N1: gl.constexpr, N2: gl.constexpr, layout: gl.constexpr):
    i0 = gl.arange(0, N0, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    i1 = gl.arange(0, N1, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))
    i2 = gl.arange(0, N2, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    return (gl.expand_dims(gl.expand_dims(i0, 1), 2), gl.expand_dims(gl.expand_dims(i1, 0), 2),
            gl.expand_dims(gl.expand_dims(i2, 0), 1))


@gluon.jit
def _slots(SPW: gl.constexpr, layout: gl.constexpr):
    """The slot index k as a [1, SPW, 1, 1] tensor of a 4-d layout."""
    k = gl.arange(0, SPW, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, layout))))
    return gl.expand_dims(gl.expand_dims(gl.expand_dims(k, 0), 2), 3)


@gluon.jit
def _extract(words, k, BITS: gl.constexpr, CW: gl.constexpr):
    """Slot k of each word, both halves, masked in place as linear codes: slot k sits at bit
    BITS * k of each half; after a shift by BITS * CW * (k // CW) it sits at e = BITS * (k % CW)."""
    e = k % CW * BITS
    mask = ((1 << BITS) - 1) << e
    return (words >> (k // CW * (CW * BITS))) & (mask | (mask << 16))


@gluon.jit
def _pairs_to_operand(pairs, ROWS: gl.constexpr, COLS: gl.constexpr, PAIRS_ON_ROWS: gl.constexpr,
                      DTYPE: gl.constexpr):
    """int32 words holding two 16-bit floats -> the floats, the pair as the fastest index of
    rows ([ROWS / 2, COLS] -> [ROWS, COLS]) or of columns ([ROWS, COLS / 2] -> [ROWS, COLS])."""
    lo = (pairs & 0xFFFF).to(gl.int16).to(DTYPE, bitcast=True)
    hi = (pairs >> 16).to(gl.int16).to(DTYPE, bitcast=True)
    x = gl.join(lo, hi)
    if PAIRS_ON_ROWS:
        x = gl.permute(x, (0, 2, 1))
    return gl.reshape(x, [ROWS, COLS])


@gluon.jit
def _key_codes(kw, D: gl.constexpr, BITS: gl.constexpr, CW: gl.constexpr, DTYPE: gl.constexpr):
    """Key words [WPT, 4, T] of a block -> codes [T, D] as the scores' A operand (K order kappa)."""
    WPT: gl.constexpr = D * BITS // 128
    SPW: gl.constexpr = 16 // BITS
    XL: gl.constexpr = _key_words_layout(WPT, SPW)
    kw = gl.convert_layout(kw, gl.SliceLayout(1, XL), assert_trivial=True)
    x = _extract(gl.expand_dims(kw, 1), _slots(SPW, XL), BITS, CW)  # [WPT, SPW, 4, T]
    x = gl.reshape(x, [D // 2, T])  # pair index (w * SPW + k) * 4 + tig
    x = gl.permute(_pairs_to_operand(x, D, T, True, DTYPE), (1, 0))
    return gl.convert_layout(x, OP_A, assert_trivial=True)


@gluon.jit
def _value_codes(vw, D: gl.constexpr, BITS: gl.constexpr, CW: gl.constexpr, DTYPE: gl.constexpr):
    """Value words [WPG, 8, T / 2] of a block -> codes [D, T] (channels in natural order) as
    the A operand of the value product."""
    WPG: gl.constexpr = D * BITS // 128
    SPW: gl.constexpr = 16 // BITS
    XL: gl.constexpr = _value_words_layout(WPG, SPW)
    vw = gl.convert_layout(vw, gl.SliceLayout(1, XL), assert_trivial=True)
    x = _extract(gl.expand_dims(vw, 1), _slots(SPW, XL), BITS, CW)  # [WPG, SPW, 8, T / 2]
    x = gl.reshape(x, [D, T // 2])  # channel (w * SPW + k) * 8 + c % 8
    return gl.convert_layout(_pairs_to_operand(x, D, T, False, DTYPE), OP_A, assert_trivial=True)


@gluon.jit
def _kappa_order(x, D: gl.constexpr, layout: gl.constexpr):
    """Channels [4, D / 4] in natural order (quarters) -> [D] in the MMA K order kappa."""
    x = gl.reshape(x, [4, D // 8, 2])
    x = gl.reshape(gl.permute(x, (1, 0, 2)), [D])
    return gl.convert_layout(x, layout, assert_trivial=True)


@gluon.constexpr_function
def _key_tile_layout(D, BITS):
    return gl.SliceLayout(1, _key_words_layout(D * BITS // 128, 16 // BITS))


@gluon.constexpr_function
def _value_tile_layout(D, BITS):
    return gl.SliceLayout(1, _value_words_layout(D * BITS // 128, 16 // BITS))


@gluon.constexpr_function
def _ring_layout(order):
    """The shared ring [STAGES, *tile] of one tile: no swizzle, the tile's dimensions in
    `order` (fastest first, as in global memory, so a lane's copy is one vector), the stage
    outermost."""
    return gl.SwizzledSharedLayout(1, 1, 1, order)


@gluon.jit
def _allocate_ring(D: gl.constexpr, G: gl.constexpr, BITS_K: gl.constexpr, BITS_V: gl.constexpr,
                   DTYPE: gl.constexpr):
    """STAGES blocks of every tile _copy_block fetches: key words [WPT, 4, T], k_scale [4, D / 4],
    value words [WPG, 8, T / 2], v_scale words [NGV, 4, 4] (_token_pairs_layout)."""
    return (gl.allocate_shared_memory(gl.int32, [STAGES, D * BITS_K // 128, 4, T], _ring_layout([0, 1, 2])),
            gl.allocate_shared_memory(DTYPE, [STAGES, 4, D // 4], _ring_layout([1, 0])),
            gl.allocate_shared_memory(gl.int32, [STAGES, D * BITS_V // 128, 8, T // 2], _ring_layout([0, 1, 2])),
            gl.allocate_shared_memory(gl.int32, [STAGES, D // G, 4, 4], _ring_layout([2, 1, 0])))


@gluon.jit
def _tile_offsets(L: gl.constexpr, D: gl.constexpr, G: gl.constexpr, BITS_K: gl.constexpr, BITS_V: gl.constexpr):
    """Each lane's element offsets into one block's tiles, from the block's first element: the
    same for every block, so computed once (a block's addresses are then its scalar base plus
    these, one wide multiply-add an element). Key words: word tig * WPT + w of each token; value
    words: word (c % 8) * WPG + w of each token pair; v_scale and v_min as words of token
    pairs, word tig + 4 i of each group's row of L / 2, v_min with its mask (rows past the value
    groups are the operand's zero padding)."""
    NGV: gl.constexpr = D // G
    WPT: gl.constexpr = D * BITS_K // 128
    WPG: gl.constexpr = D * BITS_V // 128
    w, tig, t = _grid3(WPT, 4, T, _key_tile_layout(D, BITS_K))
    key = t * (4 * WPT) + tig * WPT + w
    # k_scale: D / 32 channels a lane, no two lanes alike (the read's quarters layout has copies)
    quarter, col = _grid2(4, D // 4, gl.BlockedLayout([1, D // 32], [4, 8], [1, 1], [1, 0]))
    k_scale = quarter * (D // 4) + col
    w, cls, pair = _grid3(WPG, 8, T // 2, _value_tile_layout(D, BITS_V))
    value = pair * (8 * WPG) + cls * WPG + w
    row, tig, i = _grid3(NGV, 4, 4, gl.BlockedLayout([1, 1, 1], [2, 4, 4], [1, 1, 1], [2, 1, 0]))
    v_scale = row * (L // 2) + tig + 4 * i
    row, tig, i = _grid3(HM, 4, 4, _token_pairs_layout(HM, True))
    return key, k_scale, value, v_scale, row * (L // 2) + tig + 4 * i, row < NGV


@gluon.jit
def _copy_block(ring, stage, offsets, KP, KS, VP, VS, t0, D: gl.constexpr, G: gl.constexpr,
                BITS_K: gl.constexpr, BITS_V: gl.constexpr):
    """Start the copies of block t0 into `stage` of the ring, one commit group (offsets from
    _tile_offsets; the barrier after the wait makes every lane's copies visible to all)."""
    NGV: gl.constexpr = D // G
    key, k_scale, value, v_scale, _, _ = offsets
    _async_load(ring[0].index(stage), (KP + t0 * (D * BITS_K // 32)) + key)
    _async_load(ring[1].index(stage), (KS + t0 // G * D) + k_scale)
    _async_load(ring[2].index(stage), (VP + t0 * (D * BITS_V // 32)) + value)
    # v_scale as words of token pairs (cp.async moves 4 bytes at least)
    _async_load(ring[3].index(stage), (VS + t0).to(gl.pointer_type(gl.int32)) + v_scale)
    async_copy.commit_group()


@gluon.jit
def _key_min_table(key_bias, q_min, KM, g, NG: gl.constexpr, D: gl.constexpr):
    """Refill the shared table key_bias [16, HN] with the key-min terms sum_d k_min[g', d] q[d, h]
    of the 16 key groups g' from g // 16 * 16 on: one MMA, k_min rows as A, q as B."""
    HN: gl.constexpr = key_bias.shape[1]
    k_min = _key_min_operand(KM, g // HM * HM, NG, D)
    table = mma_v2(k_min, q_min.load(OP_B), gl.zeros([HM, HN], gl.float32, MMA))
    layout: gl.constexpr = _ring_layout([1, 0])
    if _PUBLIC_REINTERPRET:
        key_bias.reinterpret(gl.float32, [HM, HN], layout).store(table)
    else:
        key_bias._reinterpret(gl.float32, [HM, HN], layout).store(table)
    _barrier()  # the table is written before any lane reads its row


@gluon.jit
def _block_logits(ring, stage, q_code, key_bias, t0, lo, code_scale, qk_scale, D: gl.constexpr, G: gl.constexpr,
                  BITS_K: gl.constexpr, CW_K: gl.constexpr, S: gl.constexpr, W: gl.constexpr, L: gl.constexpr,
                  DTYPE: gl.constexpr):
    """The logits [T, HN] (log2 units) of block t0, in `stage`: its key codes against Qs = q_code *
    k_scale (one MMA chain a key word of the lane; units 2^(KF - EB)), plus its group's row of the
    key-min table; -inf before max(lo, S) (the window, the sinks)."""
    WPT: gl.constexpr = D * BITS_K // 128  # key words a lane reads of a token: one chunk of the scores each
    kw = ring[0].index(stage).load(_key_tile_layout(D, BITS_K))
    k_scale = _kappa_order(ring[1].index(stage).load(_quarters_layout(D)), D, gl.SliceLayout(1, OP_B))
    qs = _split_rows(q_code * gl.expand_dims(k_scale, 1), WPT)  # one rounding of an exact product
    kws = _split_leading(kw, WPT)
    scores = gl.zeros([T, q_code.shape[1]], gl.float32, MMA)
    for w in gl.static_range(WPT):  # chunk by chunk: the unpacked codes stay few registers
        qs_w = gl.convert_layout(qs[w], OP_B, assert_trivial=True)
        scores = mma_v2(_key_codes(kws[w], D // WPT, BITS_K, CW_K, DTYPE), qs_w, scores)
    bias = key_bias.index(t0 // G % HM).load(gl.SliceLayout(0, MMA))  # [HN]
    s = scores * code_scale + gl.expand_dims(bias * qk_scale, 0)
    if S > 0 or W < L:
        spos = gl.expand_dims(gl.arange(0, T, layout=gl.SliceLayout(1, MMA)), 1)  # [T, 1] token of a score row
        s = gl.where(t0 + spos >= gl.maximum(lo, S), s, float("-inf"))
    return s


@gluon.jit
def _weigh_values(s, m_i, vw, vs_raw, v_min, l_acc, v_bias, acc, D: gl.constexpr, G: gl.constexpr,
                  BITS_V: gl.constexpr, CW_V: gl.constexpr, KV: gl.constexpr, DTYPE: gl.constexpr):
    """One block's softmax numerators p = 2^(s - m_i + KV) [T, HN] into l_acc, their value-min
    terms into v_bias (one MMA, value groups as rows) and their value products into acc (one
    [G, HN] accumulator a value group: code_v as A against p * v_scale as B)."""
    NGV: gl.constexpr = D // G
    CH_V: gl.constexpr = 128 // BITS_V if 128 // BITS_V > G else G  # a value chunk: whole words, whole groups
    p = gl.exp2(s - gl.expand_dims(m_i - KV, 0))
    l_acc += p
    p_t = _value_operand(p.to(DTYPE))
    v_bias = mma_v2(v_min, p_t, v_bias)
    v_scale = _rows(vs_raw, NGV)
    vws = _split_leading(vw, D // CH_V)
    updated = ()
    for c in gl.static_range(D // CH_V):
        vals = _split_rows(_value_codes(vws[c], CH_V, BITS_V, CW_V, DTYPE), CH_V // G)
        for i in gl.static_range(CH_V // G):
            scale = gl.convert_layout(v_scale[c * (CH_V // G) + i], gl.SliceLayout(1, OP_B), assert_trivial=True)
            b_g = p_t * gl.expand_dims(scale, 1)  # 16-bit products, two a lane instruction
            a_g = gl.convert_layout(vals[i], OP_A, assert_trivial=True)
            updated = updated + (mma_v2(a_g, b_g, acc[c * (CH_V // G) + i]),)
    return l_acc, v_bias, updated


@gluon.jit
def _read_values(ring, stage, D: gl.constexpr, G: gl.constexpr, BITS_V: gl.constexpr, DTYPE: gl.constexpr):
    """The value words and v_scale of the block in `stage`, in registers."""
    return (ring[2].index(stage).load(_value_tile_layout(D, BITS_V)),
            _token_pairs(ring[3].index(stage).load(_token_pairs_layout(D // G, False)), DTYPE))


@gluon.constexpr_function
def _group_quarters_layout(D):
    """[16, 4, D / 4]: lane (g, tig) holds groups g and g + 8, channels tig * D / 4 .. of each in
    its registers (16-byte loads), the A operand's map with groups as its 16 rows."""
    lane = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    return _linear(_bits_of(D // 4, 0, 3, 2) + [[8, 0, 0]], lane, [16, 4, D // 4])


@gluon.jit
def _key_min_operand(KM, g0, NG: gl.constexpr, D: gl.constexpr):
    """k_min rows of key groups g0 .. g0 + 15 as the A operand [16, D] (K order kappa, groups as
    rows; groups from NG on read as zero)."""
    g, quarter, col = _grid3(HM, 4, D // 4, _group_quarters_layout(D))
    km = gl.load(KM + (g0 + g) * D + quarter * (D // 4) + col, mask=g0 + g < NG, other=0.0)
    km = gl.permute(gl.reshape(km, [HM, 4, D // 8, 2]), (0, 2, 1, 3))  # [16, D / 8, 4, 2]: kappa = 8j + 2 tig + u
    return gl.convert_layout(gl.reshape(km, [HM, D]), OP_A, assert_trivial=True)


@gluon.jit
def _token_pairs(words, DTYPE: gl.constexpr):
    """[R, 4, 4] words (_token_pairs_layout) -> [R, T] 16-bit floats (token 8 i + 2 tig + u)."""
    R: gl.constexpr = words.shape[0]
    return _pairs_to_operand(gl.reshape(gl.permute(words, (0, 2, 1)), [R, T // 2]), R, T, False, DTYPE)


@gluon.jit
def _load_value_min(VM, t0, offsets, DTYPE: gl.constexpr):
    """v_min of block t0 as the [HM, T] A operand (rows = value groups, the rest zero). Read
    from global memory into registers: the padded operand has no cp.async-sized pieces."""
    _, _, _, _, v_min, in_groups = offsets
    words = gl.load((VM + t0).to(gl.pointer_type(gl.int32)) + v_min, mask=in_groups, other=0)
    return gl.convert_layout(_token_pairs(words, DTYPE), OP_A, assert_trivial=True)


@gluon.jit
def _split_rows(x, N: gl.constexpr):
    """[N * M, C] -> tuple of N tensors [M, C], row block i first (N = 1, 2 or 4; the row
    blocks in registers, so no data moves)."""
    M: gl.constexpr = x.shape[0] // N
    C: gl.constexpr = x.shape[1]
    if N == 1:
        parts = (x,)
    elif N == 2:
        parts = gl.split(gl.permute(gl.reshape(x, [2, M, C]), (1, 2, 0)))
    else:
        lo, hi = gl.split(gl.permute(gl.reshape(x, [2, 2, M, C]), (2, 3, 1, 0)))
        a, b = gl.split(lo)
        c, d = gl.split(hi)
        parts = (a, b, c, d)
    return parts


@gluon.jit
def _split_leading(x, N: gl.constexpr):
    """[N * M, A, B] -> tuple of N tensors [M, A, B] (_split_rows on the flattened tail)."""
    M: gl.constexpr = x.shape[0] // N
    A: gl.constexpr = x.shape[1]
    B: gl.constexpr = x.shape[2]
    rows = _split_rows(gl.reshape(x, [N * M, A * B]), N)
    parts = ()
    for i in gl.static_range(N):
        parts = parts + (gl.reshape(rows[i], [M, A, B]),)
    return parts


@gluon.jit
def _rows(x, N: gl.constexpr):
    """[N, C] -> tuple of the N rows [C]."""
    C: gl.constexpr = x.shape[1]
    rows = _split_rows(x, N)
    parts = ()
    for i in gl.static_range(N):
        parts = parts + (gl.reshape(rows[i], [C]),)
    return parts


@gluon.jit
def _value_operand(p):
    """p [T, HN] in the accumulator's map (a lane: tokens g + 8i, heads 2 tig, 2 tig + 1 + 8j)
    -> the B operand [T, HN] of the value product (a lane: tokens 2 tig, 2 tig + 1 + 8i, heads
    g + 8j). movmatrix transposes each 8 x 8 tile of 16-bit values (one register a lane), so
    that element (r, c) of a tile lands where (c, r) was; the permute names it again."""
    R: gl.constexpr = p.shape[0]
    C: gl.constexpr = p.shape[1]
    x = gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r",
                                  [p.to(gl.int16, bitcast=True)], dtype=gl.int16, is_pure=True, pack=2)
    x = gl.reshape(gl.permute(gl.reshape(x, [R // 8, 8, C // 8, 8]), (0, 3, 2, 1)), [R, C])
    return gl.convert_layout(x.to(p.dtype, bitcast=True), OP_B, assert_trivial=True)


@gluon.jit
def _slot_stores(K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN, bh, L: gl.constexpr, D: gl.constexpr,
                 G: gl.constexpr, BITS_K: gl.constexpr, BITS_V: gl.constexpr):
    """The packed store of (slot, kv head) bh = b * H + h (int64): its codes, k_scale, k_min,
    v_scale and v_min (layouts of quantize_kv.py)."""
    return (K_PACKED + bh * L * (D * BITS_K // 32), K_SCALE + bh * (L // G) * D, K_MIN + bh * (L // G) * D,
            V_PACKED + bh * L * (D * BITS_V // 32), V_SCALE + bh * L * (D // G), V_MIN + bh * L * (D // G))


@gluon.jit
def _mma_kernel(
    Q, K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN, LENGTHS, N_QUANTIZED, O_PART, LSE_PART,
    stride_qb, stride_qh, qk_scale, NUM_SPLITS,
    H: gl.constexpr, HG: gl.constexpr, HN: gl.constexpr, NUM_CHUNKS: gl.constexpr, L: gl.constexpr,
    S: gl.constexpr, W: gl.constexpr, D: gl.constexpr, G: gl.constexpr, BITS_K: gl.constexpr, BITS_V: gl.constexpr,
    NUM_PARTS: gl.constexpr, PART0: gl.constexpr, DTYPE: gl.constexpr,
):
    gl.static_assert(G % T == 0 and D % G == 0 and D // G <= 4, "a block lies in one key group")
    gl.static_assert((BITS_K == 2 or BITS_K == 4) and (BITS_V == 2 or BITS_V == 4), "2- or 4-bit codes")
    # bits of a 16-bit float read linearly as n * 2^-EB: the mantissa and the exponent's lowest
    # bit (exponent fields 0 and 1 have the same spacing)
    LINEAR: gl.constexpr = 8 if DTYPE == gl.bfloat16 else 11
    EB: gl.constexpr = 133 if DTYPE == gl.bfloat16 else 24  # a subnormal is mantissa * 2^-EB
    KF: gl.constexpr = 64 if DTYPE == gl.bfloat16 else 0  # exponent carried by Qs
    KV: gl.constexpr = 64 if DTYPE == gl.bfloat16 else -8  # exponent carried by p (fp16: p * v_scale < 2^16)
    NGV: gl.constexpr = D // G
    SPW_K: gl.constexpr = 16 // BITS_K
    CW_K: gl.constexpr = LINEAR // BITS_K  # codes a half-word holds in place
    SPW_V: gl.constexpr = 16 // BITS_V
    CW_V: gl.constexpr = LINEAR // BITS_V

    pid = gl.program_id(0)
    chunk = pid % NUM_CHUNKS
    split = pid // NUM_CHUNKS
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_q = gl.load(N_QUANTIZED + b)
    lo = gl.maximum(gl.load(LENGTHS + b) - W, 0)  # the window's first position (W >= L: none)
    first = gl.minimum(lo // T * T, n_q)
    split_len = gl.cdiv(gl.cdiv(n_q - first, NUM_SPLITS), T) * T
    start = first + split * split_len
    q_end = gl.minimum(start + split_len, n_q)
    bh = pid_bh.to(gl.int64)

    # query heads of this program: columns of the score accumulator
    heads = chunk * HM + gl.arange(0, HN, layout=gl.SliceLayout(0, MMA))
    out_rows = (b * (H * HG) + h * HG + heads) * NUM_PARTS + PART0 + split  # [HN] rows of o_part
    if start >= q_end:
        gl.store(LSE_PART + out_rows, gl.full([HN], float("-inf"), gl.float32, gl.SliceLayout(0, MMA)),
                 mask=heads < HG)
        return

    # q [D, HN] in K order kappa (the B operand), and q * 2^(KF - e) for Qs (exact)
    kappa, r = _grid2(D, HN, OP_B)
    j = kappa // 8
    ch = kappa // 2 % 4 * (D // 4) + j * 2 + kappa % 2
    q = gl.load(Q + b * stride_qb + (h * HG + chunk * HM + r) * stride_qh + ch, mask=chunk * HM + r < HG, other=0.0)
    q_code = (q.to(gl.float32) * _pow2(KF - j % SPW_K % CW_K * BITS_K)).to(DTYPE)
    q_min = gl.allocate_shared_memory(DTYPE, [D, HN], gl.SwizzledSharedLayout(1, 1, 1, [0, 1]), q)
    key_bias = gl.allocate_shared_memory(gl.float32, [HM, HN], _ring_layout([0]))  # [key groups, heads]

    KP, KS, KM, VP, VS, VM = _slot_stores(K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN, bh, L, D, G, BITS_K,
                                          BITS_V)
    acc = ()
    for gv in gl.static_range(NGV):
        acc = acc + (gl.zeros([G, HN], gl.float32, MMA),)
    code_scale = qk_scale * _exp2(EB - KF)  # the scores' units: 2^(KF - EB)
    l_acc = gl.zeros([T, HN], gl.float32, MMA)
    v_bias = gl.zeros([HM, HN], gl.float32, MMA)  # rows: value groups
    ring = _allocate_ring(D, G, BITS_K, BITS_V, DTYPE)
    last = q_end - T  # copies past the end fetch the last block again: every iteration commits one group
    offsets = _tile_offsets(L, D, G, BITS_K, BITS_V)
    for i in gl.static_range(STAGES - 1):
        _copy_block(ring, i, offsets, KP, KS, VP, VS, gl.minimum(start + i * T, last), D, G, BITS_K, BITS_V)
    v_min_next = _load_value_min(VM, start, offsets, DTYPE)
    async_copy.wait_group(STAGES - 2)  # the first block has landed
    _barrier()
    _key_min_table(key_bias, q_min, KM, start // G, L // G, D)
    s_next = _block_logits(ring, 0, q_code, key_bias, start, lo, code_scale, qk_scale, D, G, BITS_K, CW_K, S, W, L,
                           DTYPE)
    m_i = gl.maximum(gl.max(s_next, 0), -1e30)  # [HN]
    # A software pipeline of two blocks: iteration it weighs the values of block it with m_i
    # (which already covers it) while block it + 1 is scored, in one branch-free stretch of code
    # so that the two dependent chains interleave; the rare branches (key-min table, rescale)
    # sit at the ends. The last block's values are weighed after the loop.
    n_blocks = (q_end - start) // T
    for it in range(n_blocks - 1):
        t0 = start + it * T
        t_next = t0 + T
        # the stage refilled was last read in the previous iteration (a barrier is placed before this)
        _copy_block(ring, (it + STAGES - 1) % STAGES, offsets, KP, KS, VP, VS,
                    gl.minimum(t0 + (STAGES - 1) * T, last), D, G, BITS_K, BITS_V)
        async_copy.wait_group(STAGES - 2)  # block t_next has landed
        _barrier()  # ... for every lane
        if (t_next // G % HM == 0) & (t_next % G == 0):  # block t_next opens 16 new key groups
            _key_min_table(key_bias, q_min, KM, t_next // G, L // G, D)
        s = s_next
        v_min = v_min_next
        v_min_next = _load_value_min(VM, t_next, offsets, DTYPE)
        vw, vs_raw = _read_values(ring, it % STAGES, D, G, BITS_V, DTYPE)
        s_next = _block_logits(ring, (it + 1) % STAGES, q_code, key_bias, t_next, lo, code_scale, qk_scale, D, G,
                               BITS_K, CW_K, S, W, L, DTYPE)
        l_acc, v_bias, acc = _weigh_values(s, m_i, vw, vs_raw, v_min, l_acc, v_bias, acc, D, G, BITS_V, CW_V, KV,
                                           DTYPE)
        m_blk = gl.max(s_next, 0)
        if gl.max(m_blk - m_i, 0) > TAU:  # block t_next beats the max by more than TAU
            m_new = gl.maximum(m_i, m_blk)
            alpha = gl.exp2(m_i - m_new)
            alpha_c = gl.expand_dims(alpha, 0)
            l_acc = l_acc * alpha_c
            v_bias = v_bias * alpha_c
            rescaled = ()
            for gv in gl.static_range(NGV):
                rescaled = rescaled + (acc[gv] * alpha_c,)
            acc = rescaled
            m_i = m_new
    vw, vs_raw = _read_values(ring, (n_blocks - 1) % STAGES, D, G, BITS_V, DTYPE)
    l_acc, v_bias, acc = _weigh_values(s_next, m_i, vw, vs_raw, v_min_next, l_acc, v_bias, acc, D, G, BITS_V, CW_V,
                                       KV, DTYPE)
    async_copy.wait_group(0)  # no copy outlives the program: its shared memory passes to the next one

    # o[h, c] = (acc * 2^(EB - e(c)) + v_bias[gv]) / l, every factor carrying 2^KV
    l_i = gl.sum(l_acc, 0) * _exp2(-KV)
    gl.store(LSE_PART + out_rows, m_i + gl.log2(l_i), mask=heads < HG)
    vrows, _ = _grid2(HM, HN, MMA)
    c, _ = _grid2(G, HN, MMA)
    for gv in gl.static_range(NGV):
        vb = gl.sum(gl.where(vrows == gv, v_bias, 0.0), 0) * _exp2(-KV)  # [HN]
        cg = gv * G + c
        o = acc[gv] * _pow2(EB - KV - cg // 8 % SPW_V % CW_V * BITS_V) + gl.expand_dims(vb, 0)
        o = o / gl.expand_dims(l_i, 0)
        gl.store(O_PART + gl.expand_dims(out_rows, 0) * D + cg, o, mask=gl.expand_dims(heads < HG, 0))


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def supports(q: Tensor, bits_k: int, bits_v: int, heads_per_kv: int) -> bool:
    """Whether this kernel serves q's device and dtype, the bit widths and the head grouping
    (head_dim 64 or 128 and group sizes 32..128 are checked by the caller)."""
    return (q.is_cuda and q.dtype in _GL_DTYPES and bits_k in (2, 4) and bits_v in (2, 4) and heads_per_kv <= 128
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def register_cap(head_dim: int, bits_k: int, bits_v: int, heads_per_kv: int) -> int | None:
    """Registers a thread (ptxas' maxnreg; None: ptxas' own choice); 168 gives 12 warps an SM
    (programs_per_sm). With at most 8 query heads a program (HN = 8) the kernel takes 165-177
    uncapped and 152-163 under the cap, with no spills (sm_90, every bit width, dtype and
    sinks); with 16 (MQA) it takes 197-244, and 168 measured faster only at head_dim 64 with
    2-bit codes (benchmarks/NOTES.md)."""
    if heads_per_kv <= 8 or (head_dim == 64 and bits_k == bits_v == 2):
        return 168
    return None


def programs_per_sm(head_dim: int, group_size: int, bits_k: int, bits_v: int, heads_per_kv: int,
                    registers: int | None, shared_per_sm: int) -> int:
    """One-warp programs an SM holds: a warp's registers come from one of the SM's four
    16K-register quarters (168 a thread: 12 warps, 169..192: 8; uncapped, 8 is assumed), and
    each program takes its shared memory (the ring's STAGES blocks of every tile of
    _allocate_ring, q_min [D, HN] and the key-min table [16, HN]) plus 1 KB the hardware keeps."""
    D, HN = head_dim, 16 if heads_per_kv > 8 else 8
    block = T.value * D * (bits_k + bits_v) // 8 + 2 * D + D // group_size * 64  # codes, k_scale, v_scale words
    shared = STAGES.value * block + D * HN * 2 + HM.value * HN * 4 + 1024
    by_registers = 4 * (16384 // (32 * registers)) if registers else 8
    return min(by_registers, shared_per_sm // shared)


def default_splits(programs: int, heads_per_kv: int, length: int, resident: int) -> int:
    """Splits of each slot's packed positions, for `programs` (slot, kv head) pairs over a store of
    `length` positions, with `resident` programs on the GPU at once (programs_per_sm x SMs). They
    run in waves of `resident`, so the count minimizes waves x (blocks a program + 2, its
    prologue), at least 2. MQA's head chunks read the same codes: there one wave of splits times
    the chunks, so that more of them run at once (measured in benchmarks/NOTES.md)."""
    chunks = triton.cdiv(heads_per_kv, HM)
    if chunks > 1:
        return max(2, resident // (programs * chunks)) * chunks
    blocks = triton.cdiv(length, T)
    cost = lambda s: triton.cdiv(programs * s, resident) * (triton.cdiv(blocks, s) + 2)
    return min(range(2, 65), key=cost)


def packed_attention(q: Tensor, k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor,
                     v_scale: Tensor, v_min: Tensor, lengths: Tensor, n_quantized: Tensor, o_part: Tensor,
                     lse_part: Tensor, bits_k: int, bits_v: int, group_size: int, n_sink: int, window: int,
                     qk_scale: float, num_splits: int, part0: int) -> None:
    """Write the partials of the packed positions, parts part0 .. part0 + num_splits - 1 of
    o_part [B, Hq, parts, D] and lse_part [B, Hq, parts] (see the top); window: the last
    `window` positions of each slot (window >= the store's length: all)."""
    B, Hq, D = q.shape
    H, L = k_packed.shape[1], k_packed.shape[2]
    HG = Hq // H
    chunks = triton.cdiv(HG, HM)
    _mma_kernel[(num_splits * chunks, B * H)](
        q, k_packed, k_scale, k_min, v_packed, v_scale, v_min, lengths, n_quantized, o_part, lse_part,
        q.stride(0), q.stride(1), qk_scale, num_splits,
        H=H, HG=HG, HN=16 if HG > 8 else 8, NUM_CHUNKS=chunks, L=L, S=n_sink, W=window, D=D, G=group_size, BITS_K=bits_k,
        BITS_V=bits_v, NUM_PARTS=o_part.shape[2], PART0=part0, DTYPE=_GL_DTYPES[q.dtype], num_warps=1,
        maxnreg=register_cap(D, bits_k, bits_v, HG),
    )
