"""Flash-decoding over the KIVI cache: one query token per slot, all query heads of a kv head
in one program, the token axis cut into splits whose partial results a second kernel merges.

Grid (NUM_SPLITS, B * H): program (s, b * H + h) serves query heads h*HG .. h*HG+HG-1 of slot
b (padded to HPF, a power of 2) over positions [s * SPLIT, (s + 1) * SPLIT) below lengths[b];
one whose split starts at or past the length exits at once, so cost follows the live length.
A position is read from the sinks (p < S), the packed store (S <= p < n_q) or the fp ring
(n_q <= p < length, index p % R), as in kernels/reference.py. A program writes one partial
result per region kind, (packed) and (sinks + ring), each normalized by its own sum:
    o_part [B, Hq, PARTS * NUM_SPLITS, D] fp32, lse_part [B, Hq, PARTS * NUM_SPLITS] fp32
(log2-sum-exp, -inf for an empty part; PARTS = 1 for the plain cache, L == 0), and the merge
kernel, one program per (slot, query head), weighs the live parts. SPLIT is a multiple of the
packed block, itself a multiple of G, so key groups never straddle programs.

Sinks and ring: fp tiles [BLOCK_R, D] on the tensor cores, query heads padded to HP >= 16.

Packed store, BLOCK_N tokens a step, CUDA-core FMAs with the dequantization folded away:
    s[h, t] = sum_d (q * scale_k)[h, d] * code_k[t, d] + sum_d (q * min_k)[h, d]
    o[h, c] += sum_t (p * scale_v)[h, t, c // G] * code_v[t, c] + sum_t (p * min_v)[h, t, c // G]
  Keys: per 32-channel chunk, word tiles [NR, 32] (NR = BLOCK_N * BITS_K / 32 rows, 4 lanes x 4
  warps; 8 lanes x 4 words across the channels), split into 4 [NR, 8] tiles so that the channel
  sum is an FMA chain inside a thread, then 3 shuffles. Code j of row r is token
  (r // WK) * G + j * WK + r % WK of the block (strided packing, WK = G * BITS_K / 32).
  Values live in the frame [HPF, NGV, JPG, VEC, T, WV2]: per token WV = D * BITS_V / 32 words,
  VEC of them a thread (WV2 lanes a token), T tokens over the other lanes and the warps; code
  of channel (g * JPG + jj) * WV + word sits at (g, jj, word). The block's flat token order
  j * NR + r is t * REP + k (REP = BLOCK_N / T): the scores move into the value frame once a
  block, then a static loop over the REP slices FMAs into the accumulator, whose T axis is
  summed once at the end. Every frame tensor has full T and WV2 extents, so Triton's default
  layout is the frame's on Triton 3.6 and 3.9 alike (no layout conversion in the loop).
  A code becomes a float with one LOP3: its bits masked in place and bitcast are the exact fp32
  subnormal code * 2^(b * j' - 149) (j' its place in a 23-bit window; 2-bit codes 0..10 in the
  word, 11..15 after >> 22). The other factor carries 2^KF so each product is a normal float;
  2^(149 - KF - b * j') rescales sums (per key token, per value channel at the end). This
  needs fp32 subnormals kept, which plain Triton FMAs do (no .ftz).
  Softmax rescaling is lazy: the running max moves only when a block beats it by more than
  TAU (log2 units), so p <= 2^TAU and the accumulator is rarely rescaled.
  With one query head a thread the loads of block t0 + BLOCK_N are issued before block t0's
  math (software pipelining by hand; Triton does not pipeline loads that feed no dot).
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

KF = tl.constexpr(96)  # exponent carried by the fp32 factor of each code product
TWO_KF = tl.constexpr(2.0**96)
TAU = tl.constexpr(8.0)


@triton.jit
def _pow2(e):
    """Exact 2^e as fp32 for integer e in the normal range."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _code_floats(words, j, BITS: tl.constexpr):
    """Code j of each word as the exact subnormal code * 2^(BITS * (j % CPW) - 149)."""
    CPW: tl.constexpr = 23 // BITS  # codes a window holds below the exponent field
    shift = j // CPW * (CPW * BITS)
    mask = ((1 << BITS) - 1) << (j % CPW * BITS)
    return ((words >> shift) & mask).to(tl.float32, bitcast=True)


@triton.jit
def _split4(x, A: tl.constexpr, B: tl.constexpr):
    """x [A, 4 * B], 4 consecutive inside a thread -> four [A, B]: x[:, 4 * b + e] for e = 0..3."""
    lo, hi = tl.split(tl.reshape(x, [A, B, 2, 2]))
    x0, x2 = tl.split(lo)
    x1, x3 = tl.split(hi)
    return x0, x1, x2, x3


@triton.jit
def _code_scale(j, BITS: tl.constexpr):
    """The factor undoing _code_floats' 2^(BITS * j' - 149) and the other factor's 2^KF."""
    CPW: tl.constexpr = 23 // BITS
    return _pow2(j % CPW * -BITS + (149 - KF))


@triton.jit
def _load_keys(KP, KS, KM, t0, q_end, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
               NR: tl.constexpr, E1: tl.constexpr):
    """Key words, scales and mins of block [t0, t0 + NR * 32 / BITS) of one (slot, kv head),
    nothing read past q_end: per 32-channel chunk c, each split 4 x [NR, E1] (channel e1 * 4 + e0)."""
    WK: tl.constexpr = G * BITS // 32
    r = tl.arange(0, NR)
    group = t0 // G + r // WK
    row_ok = (group * G < q_end)[:, None]
    kw = ()
    ks = ()
    km = ()
    for c in tl.static_range(D // 32):
        ch = c * 32 + tl.arange(0, 32)
        kw = kw + (_split4(tl.load(KP + (t0 * BITS // 32 + r)[:, None] * D + ch[None, :], mask=row_ok, other=0),
                           NR, E1),)
        sc = group[:, None] * D + ch[None, :]
        ks = ks + (_split4(tl.load(KS + sc, mask=row_ok, other=0.0), NR, E1),)
        km = km + (_split4(tl.load(KM + sc, mask=row_ok, other=0.0), NR, E1),)
    return kw, ks, km


@triton.jit
def _load_values(VP, VS, VM, t0, k, q_end, S: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                 BITS_K: tl.constexpr, BITS: tl.constexpr, NR: tl.constexpr, T: tl.constexpr,
                 REP: tl.constexpr, WV2: tl.constexpr, NGV: tl.constexpr):
    """Value words [VEC, T, WV2], scales and mins [NGV, T, WV2] of token slice k of block t0
    (tokens t * REP + k of the flat order), nothing read past q_end nor below S."""
    WK: tl.constexpr = G * BITS_K // 32
    WV: tl.constexpr = D * BITS // 32
    VEC: tl.constexpr = WV // WV2
    m = tl.arange(0, T) * REP + k
    pos = t0 + m % NR // WK * G + m % NR % WK + m // NR * WK  # [T]
    ok = ((pos >= S) & (pos < q_end))[:, None]
    w = tl.load(VP + pos[:, None] * WV + tl.arange(0, WV)[None, :], mask=ok, other=0)  # [T, WV]
    # each of a token's WV2 threads loads the token's NGV scales: the tile [T, WV2 * NGV] then
    # has the words' thread layout, so no layout conversion
    sc = pos[:, None] * NGV + (tl.arange(0, WV2 * NGV) % NGV)[None, :]
    vs = tl.load(VS + sc, mask=ok, other=0.0)
    vm = tl.load(VM + sc, mask=ok, other=0.0)
    return (tl.permute(tl.reshape(w, [T, WV2, VEC]), (2, 0, 1)),
            tl.permute(tl.reshape(vs, [T, WV2, NGV]), (2, 0, 1)), tl.permute(tl.reshape(vm, [T, WV2, NGV]), (2, 0, 1)))


@triton.jit
def _load_block(KP, KS, KM, VP, VS, VM, t0, q_end, S: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                BITS_K: tl.constexpr, BITS_V: tl.constexpr, NR: tl.constexpr, T: tl.constexpr,
                REP: tl.constexpr, WV2: tl.constexpr, NGV: tl.constexpr, E1: tl.constexpr):
    """Everything of block t0: (key words, scales, mins), then (words, scales, mins) per slice."""
    v = ()
    for k in tl.static_range(REP):
        v = v + (_load_values(VP, VS, VM, t0, k, q_end, S, D, G, BITS_K, BITS_V, NR, T, REP, WV2, NGV),)
    return _load_keys(KP, KS, KM, t0, q_end, D, G, BITS_K, NR, E1), v


@triton.jit
def _frame_max(x):
    """[HPF, REP, 1, 1, T, WV2] -> [HPF, 1, 1, 1, 1, 1], max over tokens."""
    return tl.max(tl.max(tl.max(x, 5, keep_dims=True), 4, keep_dims=True), 1, keep_dims=True)


@triton.jit
def _attend_fp(q, k, v, valid, m_i, l_i, acc, qk_scale):
    """One online-softmax step over fp tokens: q [HP, D], k, v [N, D], valid [N]. fp32 tiles
    multiply in full fp32 ("ieee"), not TF32, as torch's fp32 matmuls do by default."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee" if q.dtype == tl.float32 else None) * qk_scale  # [HP, N]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee" if v.dtype == tl.float32 else None)
    return m_new, l_i, acc


@triton.jit
def _store_part(O_PART, LSE_PART, hq, head_ok, part, acc, m_i, l_i, NUM_PARTS: tl.constexpr, D: tl.constexpr):
    """acc [rows, D] in natural channel order, m_i and l_i [rows]; hq [rows] query heads."""
    d = tl.arange(0, D)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(O_PART + (hq * NUM_PARTS + part)[:, None] * D + d[None, :], acc / l_safe[:, None],
             mask=head_ok[:, None])
    tl.store(LSE_PART + hq * NUM_PARTS + part, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")),
             mask=head_ok)


@triton.jit
def _decode_kernel(
    Q, K_RING, V_RING, K_SINK, V_SINK, K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN,
    LENGTHS, N_QUANTIZED, O_PART, LSE_PART, stride_qb, stride_qh, qk_scale, SPLIT, NUM_SPLITS,
    H: tl.constexpr, L: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    HG: tl.constexpr, HPF: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    BITS_K: tl.constexpr, BITS_V: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, VEC: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT: tl.constexpr,
):
    PARTS: tl.constexpr = 2 if L > 0 else 1
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    length = tl.load(LENGTHS + b)
    start = pid_s * SPLIT
    if start >= length:
        return
    n_q = tl.load(N_QUANTIZED + b)
    end = tl.minimum(start + SPLIT, length)
    q_end = tl.minimum(end, n_q)
    bh = pid_bh.to(tl.int64)
    q_ptr = Q + b * stride_qb + h * HG * stride_qh
    d = tl.arange(0, D)

    # ---- packed store: positions [start, q_end), sinks masked out ----
    # (absent from the plain fp cache, L == 0: one part a split)
    if L > 0:
        E1: tl.constexpr = 8
        C: tl.constexpr = D // 32
        WK: tl.constexpr = G * BITS_K // 32
        PK: tl.constexpr = 32 // BITS_K
        NR: tl.constexpr = BLOCK_N * BITS_K // 32
        WV: tl.constexpr = D * BITS_V // 32
        WV2: tl.constexpr = WV // VEC
        JPG: tl.constexpr = G // WV
        NGV: tl.constexpr = D // G
        REP: tl.constexpr = BLOCK_N // T
        hf = tl.arange(0, HPF)
        jk = tl.arange(0, PK)
        key_scale = _code_scale(jk, BITS_K)[None, :, None]  # [1, PK, 1]
        reps = tl.arange(0, REP)[None, :, None, None, None, None]
        mv = tl.arange(0, T)[None, None, None, None, :, None] * REP + reps  # flat token order
        tok_v = tl.broadcast_to(mv % NR // WK * G + mv % NR % WK + mv // NR * WK, [1, REP, 1, 1, T, WV2])

        g = tl.arange(0, NGV)
        jv = g[:, None] * JPG + tl.arange(0, JPG)[None, :]  # [NGV, JPG]
        val_scale = _code_scale(jv, BITS_V)

        k_base = bh * (L * BITS_K // 32) * D
        ks_base = bh * (L // G) * D
        v_base = bh * L * WV
        vs_base = bh * L * NGV
        qs = ()  # per 32-channel chunk: 4 x [HPF, E1], scaled by qk_scale * 2^KF
        for c in tl.static_range(C):
            ch = c * 32 + tl.arange(0, 32)
            q = tl.load(q_ptr + hf[:, None] * stride_qh + ch[None, :], mask=(hf < HG)[:, None], other=0.0)
            qs = qs + (_split4(q.to(tl.float32) * (qk_scale * TWO_KF), HPF, E1),)
        m_q = tl.full([HPF, 1, 1, 1, T, WV2], -1e30, tl.float32)  # every lane a copy: the frame's layout
        l_q = tl.zeros([HPF, 1, 1, 1, T, WV2], tl.float32)
        acc_q = tl.zeros([HPF, NGV, JPG, VEC, T, WV2], tl.float32)
        acc_min = tl.zeros([HPF, NGV, 1, 1, T, WV2], tl.float32)
        PREFETCH: tl.constexpr = HPF == 1  # more heads leave no registers for it
        KP = K_PACKED + k_base
        KS = K_SCALE + ks_base
        KM = K_MIN + ks_base
        VP = V_PACKED + v_base
        VS = V_SCALE + vs_base
        VM = V_MIN + vs_base
        if PREFETCH:
            nxt = _load_block(KP, KS, KM, VP, VS, VM, start, q_end, S, D, G, BITS_K, BITS_V, NR, T, REP, WV2, NGV, E1)
        for t0 in range(start, q_end, BLOCK_N):
            if PREFETCH:
                keys, vals = nxt
                kw, ks, km = keys
                nxt = _load_block(KP, KS, KM, VP, VS, VM, t0 + BLOCK_N, q_end, S, D, G, BITS_K, BITS_V,
                                  NR, T, REP, WV2, NGV, E1)
            else:
                kw, ks, km = _load_keys(KP, KS, KM, t0, q_end, D, G, BITS_K, NR, E1)
            s = tl.zeros([HPF, PK, NR, E1], tl.float32)
            bias = tl.zeros([HPF, 1, NR, E1], tl.float32)
            for c in tl.static_range(C):
                for e0 in tl.static_range(4):
                    qe = qs[c][e0][:, None, None, :]  # [HPF, 1, 1, E1]
                    s += (qe * ks[c][e0].to(tl.float32)[None, None]) * _code_floats(
                        kw[c][e0][None, None], jk[None, :, None, None], BITS_K)
                    bias += qe * km[c][e0].to(tl.float32)[None, None]
            s = tl.sum(s, 3) * key_scale + tl.sum(bias, 3) * (1.0 / TWO_KF)  # [HPF, PK, NR]
            s = tl.permute(tl.reshape(s, [HPF, T, REP]), (0, 2, 1))[:, :, None, None, :, None]
            s = tl.broadcast_to(s, [HPF, REP, 1, 1, T, WV2])
            pos = t0 + tok_v  # [1, REP, 1, 1, T, WV2]
            s = tl.where((pos >= S) & (pos < q_end), s, float("-inf"))

            m_blk = tl.broadcast_to(_frame_max(s), [HPF, 1, 1, 1, T, WV2])
            if tl.max(m_blk - m_q) > TAU:
                m_new = tl.maximum(m_q, m_blk)
                alpha = tl.exp2(m_q - m_new)
                l_q = l_q * alpha
                acc_q = acc_q * alpha
                acc_min = acc_min * alpha
                m_q = m_new
            p = tl.exp2(s - m_q)  # [HPF, REP, 1, 1, T, WV2]
            l_q += tl.sum(p, 1, keep_dims=True)
            p = p * TWO_KF  # the value products' factor 2^KF, which acc_min carries too
            for k in tl.static_range(REP):
                if PREFETCH:
                    vw, vs, vm = vals[k]
                else:
                    vw, vs, vm = _load_values(VP, VS, VM, t0, k, q_end, S, D, G, BITS_K, BITS_V, NR, T, REP,
                                              WV2, NGV)
                p_k = tl.sum(tl.where(reps == k, p, 0.0), 1, keep_dims=True)  # [HPF, 1, 1, 1, T, WV2]
                x = _code_floats(vw[None, None], jv[:, :, None, None, None], BITS_V)  # [NGV, JPG, VEC, T, WV2]
                acc_q += (p_k * vs.to(tl.float32)[None, :, None, None]) * x[None]
                acc_min += p_k * vm.to(tl.float32)[None, :, None, None]

        out_q = tl.sum(acc_q * val_scale[None, :, :, None, None, None] + acc_min * (1.0 / TWO_KF), 4)
        out_q = tl.reshape(tl.permute(out_q, (0, 1, 2, 4, 3)), [HPF, D])
        hq = b * (H * HG) + h * HG + hf
        # squeeze by reductions, not reshapes, so that the loop-carried layouts stay the frame's;
        # the WV2 lanes of a token hold copies of l
        l_q = tl.sum(tl.sum(tl.sum(tl.max(tl.sum(l_q, 4), 4), 3), 2), 1)
        m_q = tl.sum(tl.sum(tl.sum(tl.max(tl.max(m_q, 5), 4), 3), 2), 1)
        _store_part(O_PART, LSE_PART, hq, hf < HG, PARTS * pid_s, out_q, m_q, l_q, PARTS * NUM_SPLITS, D)

    # ---- sinks and ring: fp tiles on the tensor cores ----
    rows = tl.arange(0, HP)
    q = tl.load(q_ptr + rows[:, None] * stride_qh + d[None, :], mask=(rows < HG)[:, None], other=0.0).to(DOT)
    m_i = tl.full([HP], -1e30, tl.float32)
    l_i = tl.zeros([HP], tl.float32)
    acc = tl.zeros([HP, D], tl.float32)
    if S > 0:
        if start < S:
            n = tl.arange(0, 16)
            valid = (n < S) & (n < length)
            off = bh * S * D + n[:, None] * D + d[None, :]
            k = tl.load(K_SINK + off, mask=valid[:, None], other=0.0).to(DOT)
            v = tl.load(V_SINK + off, mask=valid[:, None], other=0.0).to(DOT)
            m_i, l_i, acc = _attend_fp(q, k, v, valid, m_i, l_i, acc, qk_scale)
    n = tl.arange(0, BLOCK_R)
    ring_base = bh * R * D
    for p0 in range(tl.maximum(start, tl.maximum(n_q, S)), end, BLOCK_R):
        pos = p0 + n
        valid = pos < end
        off = ring_base + (pos % R)[:, None] * D + d[None, :]
        k = tl.load(K_RING + off, mask=valid[:, None], other=0.0).to(DOT)
        v = tl.load(V_RING + off, mask=valid[:, None], other=0.0).to(DOT)
        m_i, l_i, acc = _attend_fp(q, k, v, valid, m_i, l_i, acc, qk_scale)
    hq = b * (H * HG) + h * HG + rows
    _store_part(O_PART, LSE_PART, hq, rows < HG, PARTS * pid_s + PARTS - 1, acc, m_i, l_i,
                PARTS * NUM_SPLITS, D)


@triton.jit
def _merge_kernel(O_PART, LSE_PART, OUT, LENGTHS, stride_ob, stride_oh, SPLIT, NUM_PARTS,
                  Hq: tl.constexpr, D: tl.constexpr, PARTS: tl.constexpr, NP: tl.constexpr):
    """One program per (slot, query head): out = sum_i 2^(lse_i - M) o_i / sum_i 2^(lse_i - M)
    over the parts of the live splits; a slot of length 0 gives 0."""
    pid = tl.program_id(0)
    live = PARTS * tl.cdiv(tl.load(LENGTHS + pid // Hq), SPLIT)
    i = tl.arange(0, NP)
    d = tl.arange(0, D)
    ok = i < tl.minimum(live, NUM_PARTS)
    lse = tl.load(LSE_PART + pid * NUM_PARTS + i, mask=ok, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0)), 0.0)  # [NP]
    o = tl.load(O_PART + (pid * NUM_PARTS + i)[:, None] * D + d[None, :], mask=(w > 0)[:, None], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den > 0, den, 1.0)
    tl.store(OUT + pid // Hq * stride_ob + pid % Hq * stride_oh + d, out.to(OUT.dtype.element_ty))


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def decode_attention(
    q: Tensor, k_ring: Tensor, v_ring: Tensor, k_sink: Tensor, v_sink: Tensor,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    lengths: Tensor, n_quantized: Tensor, bits_k: int, bits_v: int, group_size: int, sm_scale: float,
    num_splits: int | None = None, num_warps: int = 4, block_scale: int = 1,
) -> Tensor:
    """Triton implementation of kernels.reference.decode_attention_reference (same arguments;
    cache buffers contiguous, lengths and n_quantized int32). Returns [B, Hq, D] in q's dtype.
    num_splits, num_warps and block_scale (packed block = block_scale x the smallest) are
    tuning knobs for benchmarks; the defaults are the measured best."""
    B, Hq, D = q.shape
    H, R, S, L = k_ring.shape[1], k_ring.shape[2], k_sink.shape[2], v_packed.shape[2]
    G = group_size
    bufs = (k_ring, v_ring, k_sink, v_sink, k_packed, k_scale, k_min, v_packed, v_scale, v_min)
    if not all(t.is_contiguous() for t in bufs) or q.stride(2) != 1:
        raise ValueError("cache buffers must be contiguous and q's last dim dense")
    if D not in (64, 128) or {bits_k, bits_v} - {2, 4, 8} or G not in (32, 64, 128) or G > D or S > 16:
        raise ValueError(f"unsupported shape: head_dim {D}, bits {bits_k}/{bits_v}, group {G}, sinks {S}")
    block_n = max(512 // bits_k, G) * block_scale  # >= 16 key word rows: 4 per warp, no warp splits a channel sum
    block_r = 64
    HG = Hq // H
    hpf = triton.next_power_of_2(HG)
    wv = D * bits_v // 32
    vec = min(wv, max(1, 4 // hpf))  # value words a thread: 4 (16-byte loads) unless heads fill registers
    max_len = max(L, R)
    if num_splits is None:  # measured: the packed path runs best with the fewest programs that fill
        # the SMs (two fit an SM), the plain cache with about 8 an SM
        num_splits = 2 * _num_sms(q.device) // (B * H) if L > 0 else triton.cdiv(8 * _num_sms(q.device), B * H)
    num_splits = max(1, min(num_splits, triton.cdiv(max_len, block_n)))
    split = triton.cdiv(triton.cdiv(max_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_len, split)
    # the interpreter has no bf16 arithmetic: its dots run in fp32
    dot = torch.float32 if q.dtype == torch.float32 or (q.device.type == "cpu" and q.dtype == torch.bfloat16) else q.dtype
    parts = 2 if L > 0 else 1
    o_part = torch.empty(B, Hq, parts * num_splits, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, Hq, parts * num_splits, device=q.device, dtype=torch.float32)
    _decode_kernel[(num_splits, B * H)](
        q, k_ring, v_ring, k_sink, v_sink, k_packed, k_scale, k_min, v_packed, v_scale, v_min,
        lengths, n_quantized, o_part, lse_part, q.stride(0), q.stride(1), sm_scale * 1.4426950408889634,
        split, num_splits, H=H, L=L, R=R, S=S, HG=HG, HPF=hpf, HP=max(16, hpf),
        D=D, G=G, BITS_K=bits_k, BITS_V=bits_v, BLOCK_N=block_n, T=32 * num_warps * vec // wv, VEC=vec,
        BLOCK_R=block_r, DOT=_TL_DTYPES[dot],
        num_warps=num_warps,
    )
    out = torch.empty_like(q)
    _merge_kernel[(B * Hq,)](o_part, lse_part, out, lengths, out.stride(0), out.stride(1), split, parts * num_splits,
                             Hq=Hq, D=D, PARTS=parts, NP=triton.next_power_of_2(parts * num_splits))
    return out
