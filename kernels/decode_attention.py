"""Flash-decoding over the KIVI cache: one query token per slot, all query heads of a kv head
in one program, the token axis cut into splits whose partial results a second kernel merges.

Two ways to read the packed store, chosen in decode_attention() below:
  - tensor cores (CUDA, bf16/fp16, 2- and 4-bit codes): kernels/mma_attention.py (mma.sync, one
    warp a program), or for wide head groups in bf16 on Hopper kernels/wgmma_attention.py
    (warpgroup MMA, every head of a group in one program); either writes one partial per split
    of the packed positions, and the kernel here, launched with
    PACKED = False and one split, writes the partial of the sinks and the ring (with grouped
    heads on a side stream, beside the packed kernel);
  - here, for everything else (fp32, 8-bit codes, the Triton interpreter): every position.

Grid (NUM_SPLITS, B * H): program (s, b * H + h) serves query heads h*HG .. h*HG+HG-1 of slot
b (padded to HP >= 16 rows, a power of 2) over positions [s * SPLIT, (s + 1) * SPLIT) below
lengths[b]; one whose split starts at or past the length exits at once, so cost follows the
live length. With a sliding window of W positions a slot attends [lo, length), lo =
max(0, length - W), and the splits start at lo's key group instead of 0: cost follows
min(length, W). A position is read from the sinks (p < S), the packed store (S <= p < n_q) or the
fp ring (n_q <= p < length, index p % R), as in kernels/reference.py, with one online softmax
over the three, and the program writes one partial result at part PART0 + s:
    o_part [B, Hq, NUM_PARTS, D] fp32 (normalized), lse_part [B, Hq, NUM_PARTS] fp32
(log2-sum-exp, -inf for nothing), which the merge kernel, one program per (slot, query head),
weighs. SPLIT is a multiple of G, so key groups and value token pairs never straddle programs.

Packed blocks of BLOCK_N tokens (one key group) are unpacked by shifts into [BLOCK_N, D] code
tiles (layouts of quantize_kv.py), dequantized in fp32, rounded to the model dtype as the
reference rounds them, and multiplied on the tensor cores with tl.dot like the fp tiles.
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.quantize import _pair_shifts

try:  # Gluon and the layouts this kernel states explicitly: Triton 3.6 and later
    from kernels import mma_attention, wgmma_attention
except (ImportError, AttributeError):
    mma_attention = wgmma_attention = None

BLOCK_N = 32  # packed tokens a step (divides every G)
BLOCK_R = 64  # ring tokens a step


@triton.jit
def _attend(q, k, v, valid, m_i, l_i, acc, qk_scale):
    """One online-softmax step: q [HP, D], k, v [N, D], valid [N]. fp32 tiles multiply in full
    fp32 ("ieee"), not TF32, as torch's fp32 matmuls do by default."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee" if q.dtype == tl.float32 else None) * qk_scale  # [HP, N]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee" if v.dtype == tl.float32 else None)
    return m_new, l_i, acc


@triton.jit
def _packed_keys(KP, KS, KM, t0, BLOCK_N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                 DOT: tl.constexpr):
    """Dequantized keys [BLOCK_N, D] of tokens t0 .. (one key group) in the model dtype."""
    PW: tl.constexpr = 32 // BITS
    W: tl.constexpr = D // PW
    tok = t0 + tl.arange(0, BLOCK_N)
    words = tl.load(KP + tok[:, None] * W + tl.arange(0, W)[None, :])  # [BLOCK_N, W]
    codes = (words[:, :, None] >> _pair_shifts(PW, BITS)[None, None, :]) & ((1 << BITS) - 1)
    codes = tl.reshape(codes, [BLOCK_N, D])  # channel w * PW + i
    d = t0 // G * D + tl.arange(0, D)
    k = codes.to(tl.float32) * tl.load(KS + d).to(tl.float32)[None, :] + tl.load(KM + d).to(tl.float32)[None, :]
    return k.to(DOT)


@triton.jit
def _packed_values(VP, VS, VM, t0, BLOCK_N: tl.constexpr, L: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                   BITS: tl.constexpr, DOT: tl.constexpr):
    """Dequantized values [BLOCK_N, D] of tokens t0 .. in the model dtype."""
    SPW: tl.constexpr = 16 // BITS
    NGV: tl.constexpr = D // G
    P: tl.constexpr = BLOCK_N // 2
    pair = t0 // 2 + tl.arange(0, P)
    words = tl.load(VP + pair[:, None] * (D // SPW) + tl.arange(0, D // SPW)[None, :])  # [P, 2W]
    shift = _pair_shifts(2 * SPW, BITS)  # position 2k + u: slot k, token 2p + u
    codes = (words[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)  # [P, 2W, 2 * SPW]
    codes = tl.reshape(codes, [P, 8, D // 8, 2])  # slot n = (c % 8) * D / 8 + c // 8
    codes = tl.reshape(tl.permute(codes, (0, 3, 2, 1)), [BLOCK_N, NGV, G])  # token 2p + u, channel c
    tok = t0 + tl.arange(0, BLOCK_N)
    sc = tok[:, None] + tl.arange(0, NGV)[None, :] * L  # [BLOCK_N, NGV]: group g's row of L tokens
    v = codes.to(tl.float32) * tl.load(VS + sc).to(tl.float32)[:, :, None] + tl.load(VM + sc).to(tl.float32)[:, :, None]
    return tl.reshape(v, [BLOCK_N, D]).to(DOT)


@triton.jit
def _store_part(O_PART, LSE_PART, hq, head_ok, part, acc, m_i, l_i, NUM_PARTS: tl.constexpr, D: tl.constexpr):
    """acc [rows, D], m_i and l_i [rows]; hq [rows] query heads."""
    d = tl.arange(0, D)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(O_PART + (hq * NUM_PARTS + part)[:, None] * D + d[None, :], acc / l_safe[:, None],
             mask=head_ok[:, None])
    tl.store(LSE_PART + hq * NUM_PARTS + part, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")),
             mask=head_ok)


@triton.jit
def _decode_kernel(
    Q, K_RING, V_RING, K_SINK, V_SINK, K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN,
    LENGTHS, N_QUANTIZED, O_PART, LSE_PART, stride_qb, stride_qh, qk_scale, SPLIT,
    H: tl.constexpr, L: tl.constexpr, R: tl.constexpr, S: tl.constexpr, W: tl.constexpr, HG: tl.constexpr,
    HP: tl.constexpr,
    D: tl.constexpr, G: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr, PACKED: tl.constexpr,
    NUM_PARTS: tl.constexpr, PART0: tl.constexpr, DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    tl.static_assert(G % BLOCK_N == 0, "a packed block lies in one key group")
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    length = tl.load(LENGTHS + b)
    lo = tl.maximum(length - W, 0)  # the window's first position (W: the window, or every position)
    start = lo // G * G + pid_s * SPLIT
    if start >= length:
        return
    n_q = tl.load(N_QUANTIZED + b)
    end = tl.minimum(start + SPLIT, length)
    bh = pid_bh.to(tl.int64)
    rows = tl.arange(0, HP)
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + (h * HG + rows)[:, None] * stride_qh + d[None, :], mask=(rows < HG)[:, None],
                other=0.0).to(DOT)
    m_i = tl.full([HP], -1e30, tl.float32)
    l_i = tl.zeros([HP], tl.float32)
    acc = tl.zeros([HP, D], tl.float32)

    if S > 0:
        if start < S:
            n = tl.arange(0, 16)
            valid = (n < S) & (n < length) & (n >= lo)
            off = bh * S * D + n[:, None] * D + d[None, :]
            k = tl.load(K_SINK + off, mask=valid[:, None], other=0.0).to(DOT)
            v = tl.load(V_SINK + off, mask=valid[:, None], other=0.0).to(DOT)
            m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, qk_scale)

    if PACKED:  # positions [start, min(end, n_q)), whole blocks; sinks masked out
        KP = K_PACKED + bh * L * (D * BITS_K // 32)
        KS = K_SCALE + bh * (L // G) * D
        KM = K_MIN + bh * (L // G) * D
        VP = V_PACKED + bh * L * (D * BITS_V // 32)
        VS = V_SCALE + bh * L * (D // G)
        VM = V_MIN + bh * L * (D // G)
        first = tl.maximum(lo, S)
        for t0 in range(start, tl.minimum(end, n_q), BLOCK_N):
            k = _packed_keys(KP, KS, KM, t0, BLOCK_N, D, G, BITS_K, DOT)
            v = _packed_values(VP, VS, VM, t0, BLOCK_N, L, D, G, BITS_V, DOT)
            m_i, l_i, acc = _attend(q, k, v, t0 + tl.arange(0, BLOCK_N) >= first, m_i, l_i, acc, qk_scale)

    n = tl.arange(0, BLOCK_R)
    ring_base = bh * R * D
    for p0 in range(tl.maximum(start, tl.maximum(n_q, S)), end, BLOCK_R):
        pos = p0 + n
        valid = (pos < end) & (pos >= lo)
        off = ring_base + (pos % R)[:, None] * D + d[None, :]
        k = tl.load(K_RING + off, mask=valid[:, None], other=0.0).to(DOT)
        v = tl.load(V_RING + off, mask=valid[:, None], other=0.0).to(DOT)
        m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, qk_scale)
    hq = b * (H * HG) + h * HG + rows
    _store_part(O_PART, LSE_PART, hq, rows < HG, PART0 + pid_s, acc, m_i, l_i, NUM_PARTS, D)


@triton.jit
def _merge_kernel(O_PART, LSE_PART, OUT, LENGTHS, stride_ob, stride_oh, SPLIT, PER_SPLIT, NUM_PARTS,
                  Hq: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, W: tl.constexpr):
    """One program per (slot, query head): out = sum_i 2^(lse_i - M) o_i / sum_i 2^(lse_i - M)
    over the first min(PER_SPLIT * cdiv(length - first, SPLIT), NUM_PARTS) parts, first the
    window's first key group (the others were not written); a slot of length 0 gives 0."""
    pid = tl.program_id(0)
    length = tl.load(LENGTHS + pid // Hq)
    first = tl.maximum(length - W, 0) // G * G
    live = tl.minimum(PER_SPLIT * tl.cdiv(length - first, SPLIT), NUM_PARTS)
    i = tl.arange(0, NP)
    d = tl.arange(0, D)
    lse = tl.load(LSE_PART + pid * NUM_PARTS + i, mask=i < live, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0)), 0.0)  # [NP]
    # read beside lse, not after it; a part with nothing (-inf) may hold garbage, NaN included
    o = tl.load(O_PART + (pid * NUM_PARTS + i)[:, None] * D + d[None, :], mask=(i < live)[:, None], other=0.0)
    o = tl.where((w > 0)[:, None], o, 0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den > 0, den, 1.0)
    tl.store(OUT + pid // Hq * stride_ob + pid % Hq * stride_oh + d, out.to(OUT.dtype.element_ty))


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@functools.cache
def _shared_per_sm(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor


def decode_attention(
    q: Tensor, k_ring: Tensor, v_ring: Tensor, k_sink: Tensor, v_sink: Tensor,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    lengths: Tensor, n_quantized: Tensor, bits_k: int, bits_v: int, group_size: int, sm_scale: float,
    window: int = 0, num_splits: int | None = None, tensor_cores: bool | None = None,
) -> Tensor:
    """Triton implementation of kernels.reference.decode_attention_reference (same arguments;
    cache buffers contiguous, lengths and n_quantized int32). Returns [B, Hq, D] in q's dtype.
    window > 0: each slot attends its last `window` positions only.
    num_splits (of the packed positions) and tensor_cores (None: wherever they serve) are
    knobs for benchmarks and tests; the defaults are the measured best."""
    B, Hq, D = q.shape
    H, R, S, L = k_ring.shape[1], k_ring.shape[2], k_sink.shape[2], k_packed.shape[2]
    G = group_size
    bufs = (k_ring, v_ring, k_sink, v_sink, k_packed, k_scale, k_min, v_packed, v_scale, v_min)
    if not all(t.is_contiguous() for t in bufs) or q.stride(2) != 1:
        raise ValueError("cache buffers must be contiguous and q's last dim dense")
    if D not in (64, 128) or {bits_k, bits_v} - {2, 4, 8} or G not in (32, 64, 128) or G > D or S > 16:
        raise ValueError(f"unsupported shape: head_dim {D}, bits {bits_k}/{bits_v}, group {G}, sinks {S}")
    if window < 0:
        raise ValueError(f"sliding window {window} must be >= 0 (0: none)")
    max_len = max(L, R)  # no slot is longer
    # positions from the window's first key group on: at most window + G - 1 of them
    span = min(max_len, window + G - 1) if window else max_len
    W = window or max_len
    HG = Hq // H
    supported = L > 0 and mma_attention is not None and mma_attention.supports(q, bits_k, bits_v, HG)
    if tensor_cores and not supported:
        raise ValueError(f"no tensor-core path for {q.dtype} on {q.device}, bits {bits_k}/{bits_v}, {HG} heads a group")
    use_mma = supported if tensor_cores is None else tensor_cores
    sms = _num_sms(q.device)
    # wide groups on Hopper: one warpgroup dequantizes a block once for all heads
    wide = use_mma and wgmma_attention.supports(q, bits_k, bits_v, HG) and L % wgmma_attention.TB.value == 0
    packed = wgmma_attention if wide else mma_attention
    if wide:
        num_splits = num_splits or wgmma_attention.default_splits(B * H, L, sms)
    elif use_mma:
        cap = mma_attention.register_cap(D, bits_k, bits_v, HG)
        per_sm = mma_attention.programs_per_sm(D, G, bits_k, bits_v, HG, cap, _shared_per_sm(q.device))
        num_splits = num_splits or mma_attention.default_splits(B * H, HG, L, per_sm * sms)
    if use_mma:
        ring_split = max_len  # the sinks and the ring in one program a (slot, kv head), part 0
        parts, ring_parts = 1 + num_splits, 1
    else:
        if num_splits is None:  # about 8 programs an SM
            num_splits = triton.cdiv(8 * sms, B * H)
        num_splits = max(1, min(num_splits, triton.cdiv(span, G)))
        split = triton.cdiv(triton.cdiv(span, num_splits), G) * G
        ring_split, ring_parts = split, triton.cdiv(span, split)
        parts = ring_parts
    # the interpreter has no bf16 arithmetic: its dots run in fp32
    dot = torch.float32 if q.dtype == torch.float32 or (q.device.type == "cpu" and q.dtype == torch.bfloat16) else q.dtype
    o_part = torch.empty(B, Hq, parts, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, Hq, parts, device=q.device, dtype=torch.float32)
    qk_scale = sm_scale * 1.4426950408889634
    # tensor cores: the ring's partial runs on a side stream, beside the packed kernel (other parts)
    # (grouped heads only: at one head a group its B * H programs of padded 16-row tiles slowed the
    # packed kernel more than they hid, benchmarks/NOTES.md)
    side = _side_stream(q.device) if use_mma and HG > 1 else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(q.device))
    with torch.cuda.stream(side):  # None: the current stream
        _decode_kernel[(ring_parts, B * H)](
            q, k_ring, v_ring, k_sink, v_sink, k_packed, k_scale, k_min, v_packed, v_scale, v_min,
            lengths, n_quantized, o_part, lse_part, q.stride(0), q.stride(1), qk_scale, ring_split,
            H=H, L=L, R=R, S=S, W=W, HG=HG, HP=max(16, triton.next_power_of_2(HG)), D=D, G=G, BITS_K=bits_k,
            BITS_V=bits_v, PACKED=L > 0 and not use_mma, NUM_PARTS=parts, PART0=0, DOT=_TL_DTYPES[dot],
            BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
        )
    if use_mma:
        packed.packed_attention(q, k_packed, k_scale, k_min, v_packed, v_scale, v_min, lengths, n_quantized,
                                o_part, lse_part, bits_k, bits_v, G, S, W, qk_scale, num_splits, part0=1)
        if side is not None:
            torch.cuda.current_stream(q.device).wait_stream(side)  # the merge reads both
    out = torch.empty_like(q)
    # plain: the parts of the splits below the length; tensor cores: every part of a live slot
    merge_split, per_split = (ring_split, parts) if use_mma else (split, 1)
    NP = triton.next_power_of_2(parts)
    _merge_kernel[(B * Hq,)](o_part, lse_part, out, lengths, out.stride(0), out.stride(1), merge_split, per_split,
                             parts, Hq=Hq, D=D, NP=NP, G=G, W=W, num_warps=min(8, max(1, NP * D // 1024)))  # ~32 a thread
    return out
