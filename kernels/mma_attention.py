"""Decode attention over the packed KIVI store on the tensor cores (Gluon, mma.sync m16n8k16).

One warp a program. Grid (NUM_SPLITS * NUM_CHUNKS, B * H): program (s * NUM_CHUNKS + c, b * H + h)
serves query heads c*16 .. c*16+15 of kv head h of slot b (the heads h*HG + ..., HN = 8 or 16 of
them: the N of every MMA; heads past HG run on zero queries and are not stored) over split s
of the slot's packed positions [lo, n_q[b]) cut into NUM_SPLITS runs of whole T = 32 token
blocks (a block lies in one key group: G is a multiple of T), so the work follows each slot's
live length; lo is 0, or with a sliding window of W positions the block of max(0, length - W). It
writes one partial result (normalized output and log2-sum-exp, -inf when it has no tokens) at
part PART0 + s; the sinks, the ring and the merge are kernels/decode_attention.py's.

A 2- or 4-bit code c whose bits are masked into the low mantissa of an otherwise zero 16-bit
float is the exact subnormal c * 2^(e - EB) (EB = 133 for bf16, 24 for fp16; e its bit offset),
and a word gives two of them, its two halves, with one LOP3: that pair is one 32-bit MMA
operand register. The store's packed layouts (quantize_kv.py) put the pairs where the MMA
fragments want them, so codes go from memory to the tensor cores with a shift and a mask:

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
block t0 + (STAGES - 1) * T is in flight while block t0 is computed.

Layouts: every register tensor has an explicit layout (linear layouts spelled out below, or
the mma.sync operand layouts), chosen so that the words a lane loads are, after the shift
and mask, exactly its operand fragments; each such step is a convert_layout with
assert_trivial=True, so a layout that would need data movement fails to compile.
Launch heuristics (splits, one warp, the register cap) live in default_splits(), register_cap() and
packed_attention().

Adding a bit width b (it must fit a 16-bit float's mantissa: b <= 7 for bf16):
  1. quantize_kv.SUPPORTED_BITS and the pair packing there hold it already if 16 % b == 0;
  2. here, allow b in the static_assert and in supports(); _extract's window CW = MANT // b
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
    """Slot k of each word, both halves, masked in place as subnormal codes: slot k sits at bit
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
    quarter, col = _grid2(4, D // 4, _quarters_layout(D))
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
    """Start the copies of block t0 into `stage` of the ring, one commit group. Each tile is
    copied in the register layout _read_block reads it in (offsets from _tile_offsets)."""
    NGV: gl.constexpr = D // G
    key, k_scale, value, v_scale, _, _ = offsets
    async_copy.async_copy_global_to_shared(ring[0].index(stage), (KP + t0 * (D * BITS_K // 32)) + key)
    async_copy.async_copy_global_to_shared(ring[1].index(stage), (KS + t0 // G * D) + k_scale)
    async_copy.async_copy_global_to_shared(ring[2].index(stage), (VP + t0 * (D * BITS_V // 32)) + value)
    # v_scale as words of token pairs (cp.async moves 4 bytes at least)
    async_copy.async_copy_global_to_shared(ring[3].index(stage), (VS + t0).to(gl.pointer_type(gl.int32)) + v_scale)
    async_copy.commit_group()


@gluon.jit
def _read_block(ring, stage, D: gl.constexpr, G: gl.constexpr, BITS_K: gl.constexpr, BITS_V: gl.constexpr,
                DTYPE: gl.constexpr):
    """The tiles of one ring stage in registers."""
    return (ring[0].index(stage).load(_key_tile_layout(D, BITS_K)),
            ring[1].index(stage).load(_quarters_layout(D)),
            ring[2].index(stage).load(_value_tile_layout(D, BITS_V)),
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
def _mma_kernel(
    Q, K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN, LENGTHS, N_QUANTIZED, O_PART, LSE_PART,
    stride_qb, stride_qh, qk_scale, NUM_SPLITS,
    H: gl.constexpr, HG: gl.constexpr, HN: gl.constexpr, NUM_CHUNKS: gl.constexpr, L: gl.constexpr,
    S: gl.constexpr, W: gl.constexpr, D: gl.constexpr, G: gl.constexpr, BITS_K: gl.constexpr, BITS_V: gl.constexpr,
    NUM_PARTS: gl.constexpr, PART0: gl.constexpr, DTYPE: gl.constexpr,
):
    gl.static_assert(G % T == 0 and D % G == 0 and D // G <= 4, "a block lies in one key group")
    gl.static_assert((BITS_K == 2 or BITS_K == 4) and (BITS_V == 2 or BITS_V == 4), "2- or 4-bit codes")
    MANT: gl.constexpr = 7 if DTYPE == gl.bfloat16 else 10  # mantissa bits of the operand dtype
    EB: gl.constexpr = 133 if DTYPE == gl.bfloat16 else 24  # a subnormal is mantissa * 2^-EB
    KF: gl.constexpr = 64 if DTYPE == gl.bfloat16 else 0  # exponent carried by Qs
    KV: gl.constexpr = 64 if DTYPE == gl.bfloat16 else -8  # exponent carried by p (fp16: p * v_scale < 2^16)
    NGV: gl.constexpr = D // G
    SPW_K: gl.constexpr = 16 // BITS_K
    CW_K: gl.constexpr = MANT // BITS_K  # codes a half-word holds in place below the exponent
    SPW_V: gl.constexpr = 16 // BITS_V
    CW_V: gl.constexpr = MANT // BITS_V

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

    KP = K_PACKED + bh * L * (D * BITS_K // 32)
    KS = K_SCALE + bh * (L // G) * D
    KM = K_MIN + bh * (L // G) * D
    VP = V_PACKED + bh * L * (D * BITS_V // 32)
    VS = V_SCALE + bh * L * NGV
    VM = V_MIN + bh * L * NGV
    acc = ()
    for gv in gl.static_range(NGV):
        acc = acc + (gl.zeros([G, HN], gl.float32, MMA),)
    code_scale = qk_scale * _exp2(EB - KF)  # the scores' units: 2^(KF - EB)
    m_i = gl.full([HN], -1e30, gl.float32, gl.SliceLayout(0, MMA))
    l_acc = gl.zeros([T, HN], gl.float32, MMA)
    v_bias = gl.zeros([HM, HN], gl.float32, MMA)  # rows: value groups
    WPT: gl.constexpr = D * BITS_K // 128  # key words a lane reads of a token: one chunk of the scores each
    CH_V: gl.constexpr = 128 // BITS_V if 128 // BITS_V > G else G  # a value chunk: whole words, whole groups
    spos = gl.expand_dims(gl.arange(0, T, layout=gl.SliceLayout(1, MMA)), 1)  # [T, 1] token of a score row
    ring = _allocate_ring(D, G, BITS_K, BITS_V, DTYPE)
    last = q_end - T  # copies past the end fetch the last block again: every iteration commits one group
    offsets = _tile_offsets(L, D, G, BITS_K, BITS_V)
    for i in gl.static_range(STAGES - 1):
        _copy_block(ring, i, offsets, KP, KS, VP, VS, gl.minimum(start + i * T, last), D, G, BITS_K, BITS_V)
    v_min_next = _load_value_min(VM, start, offsets, DTYPE)
    for it in range((q_end - start) // T):
        t0 = start + it * T
        async_copy.wait_group(STAGES - 2)  # block t0 has landed
        gl.thread_barrier()  # ... for every lane; and every lane is done reading the stage refilled next
        kw, ks_raw, vw, vs_raw = _read_block(ring, it % STAGES, D, G, BITS_K, BITS_V, DTYPE)
        v_min = v_min_next
        v_min_next = _load_value_min(VM, gl.minimum(t0 + T, last), offsets, DTYPE)
        _copy_block(ring, (it + STAGES - 1) % STAGES, offsets, KP, KS, VP, VS,
                    gl.minimum(t0 + (STAGES - 1) * T, last), D, G, BITS_K, BITS_V)

        k_scale = _kappa_order(ks_raw, D, gl.SliceLayout(1, OP_B))
        g = t0 // G
        if (it == 0) | ((g % HM == 0) & (t0 % G == 0)):  # the key-min terms of the next 16 key groups
            k_min = _key_min_operand(KM, g // HM * HM, L // G, D)
            table = mma_v2(k_min, q_min.load(OP_B), gl.zeros([HM, HN], gl.float32, MMA))
            key_bias._reinterpret(gl.float32, [HM, HN], _ring_layout([1, 0])).store(table)
            gl.thread_barrier()  # the table is written before any lane reads its row
        bias = key_bias.index(g % HM).load(gl.SliceLayout(0, MMA))  # [HN]
        qs = _split_rows(q_code * gl.expand_dims(k_scale, 1), WPT)  # one rounding of an exact product
        kws = _split_leading(kw, WPT)
        scores = gl.zeros([T, HN], gl.float32, MMA)
        for w in gl.static_range(WPT):  # chunk by chunk: the unpacked codes stay few registers
            qs_w = gl.convert_layout(qs[w], OP_B, assert_trivial=True)
            scores = mma_v2(_key_codes(kws[w], D // WPT, BITS_K, CW_K, DTYPE), qs_w, scores)
        s = scores * code_scale + gl.expand_dims(bias * qk_scale, 0)
        if S > 0 or W < L:  # the sinks, and positions before the window
            s = gl.where(t0 + spos >= gl.maximum(lo, S), s, float("-inf"))

        m_blk = gl.max(s, 0)
        if gl.max(m_blk - m_i, 0) > TAU:
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
        p = gl.exp2(s - gl.expand_dims(m_i - KV, 0))  # [T, HN], carries 2^KV
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
        acc = updated

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


def register_cap(head_dim: int, bits_k: int, bits_v: int) -> int | None:
    """Registers a thread (ptxas' maxnreg; None: ptxas' own choice, 208-234 at head_dim 128).
    168 (12 warps an SM, no spills) at head_dim 64 with 2-bit codes, where it measured 9%
    faster for MQA and even elsewhere; at head_dim 128 it was within -4%..+5% and at 4 bits
    slower (benchmarks/NOTES.md)."""
    return 168 if head_dim == 64 and bits_k == bits_v == 2 else None


def default_splits(programs: int, heads_per_kv: int, head_dim: int, sms: int, registers: int | None) -> int:
    """Splits of each slot's packed positions, for `programs` (slot, kv head) pairs: one wave of
    the one-warp programs an SM holds at their register use (the cap `registers`, or uncapped 8
    at head_dim 128, 12 at 64), at least 2, times the head chunks (MQA's chunks read the same
    codes: more of them at once); measured in benchmarks/NOTES.md."""
    chunks = triton.cdiv(heads_per_kv, HM)
    warps = 65536 // (32 * registers) if registers else 8 if head_dim == 128 else 12
    resident = warps * sms
    return max(2, resident // (programs * chunks)) * chunks


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
        maxnreg=register_cap(D, bits_k, bits_v),
    )
