"""Quantize-and-pack whole groups into the KIVI store (the layouts of quantize_kv.py), bit for
bit as the reference does (kernels/reference.py):

  flush: the oldest G ring tokens of every slot whose ring became full with its last append.
    Grid (B * H,), one program per (slot, kv head). The predicate length >= R and
    (length - R) % G == 0 is evaluated inside the kernel, so the launch is the same every
    step (CUDA-graph friendly); elsewhere the program exits after reading the length. The
    group starts at p0 = length - R; token p sits at ring index p % R.
  quantize_prompt: the whole groups of n prompts packed along one token axis, k, v [N, H, D]
    (any strides with a dense last dim); prompt i's first count_i tokens (a multiple of G,
    from packed token first_i) into the store of its slot. Grid (n * H, longest / G), one
    program per (prompt, kv head, group); a group past its prompt's count exits at once.

One group of one (slot, kv head), tokens p0 .. p0+G-1 (layouts of quantize_kv.py):
  Keys, per channel over the G tokens: tile [G, D], codes viewed as [G, W, PW] (channel
  w * PW + i) for the packing; word w of a token = sum_i code[i] << (BITS_K * (i // 2) + 16 * (i % 2)). Positions below S (sinks,
  group 0 only) take the values of position S for min/max.
  Values, per token over G channels: tile [G / 2, 2, NGV, G / 8, 8] (pair, token in the pair,
  group, channel // 8 in the group, channel % 8); reordered to [G / 2, D / SPW, SPW, 2] (pair,
  word, slot, token: slot n = (c % 8) * D / 8 + c // 8 of the pair), word = sum over its slots
  k and tokens u of code << (BITS_V * k + 16 * u).
Arithmetic is quantize_kv.quantize's: fp32 statistics, min and scale rounded to the storage
dtype before the codes, the scale an IEEE quotient, a code the product of x - min and the
scale's IEEE inverse rounded once (a fused multiply-add, half to even), a constant group ->
scale 0, codes 0.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

ROUND = tl.constexpr(12582912.0)  # 1.5 * 2^23: (x + ROUND) - ROUND rounds half to even for |x| < 2^22


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _quantize(x, lo, hi, BITS: tl.constexpr, DTYPE: tl.constexpr):
    """Codes of x (fp32) against fp32 group min lo and max hi (broadcastable), and the stored
    (scale, min) rounded to DTYPE."""
    max_code: tl.constexpr = (1 << BITS) - 1
    x_min = lo.to(DTYPE).to(tl.float32)
    scale = tl.math.div_rn(hi - x_min, tl.full(hi.shape, max_code, tl.float32)).to(DTYPE).to(tl.float32)
    inverse = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), tl.where(scale > 0, scale, 1.0))
    q = tl.math.fma(x - x_min, inverse, ROUND) - ROUND  # one rounding: the exact product, half to even
    codes = tl.where(scale > 0, tl.minimum(tl.maximum(q, 0.0), max_code), 0.0).to(tl.int32)
    return codes, scale.to(DTYPE), x_min.to(DTYPE)


@triton.jit
def _pair_shifts(N: tl.constexpr, BITS: tl.constexpr):
    """Bit offset of position i of a packed word, i < N: BITS * (i // 2) + 16 * (i % 2)."""
    i = tl.arange(0, N)
    return BITS * (i // 2) + 16 * (i % 2)


@triton.jit
def _quantize_group(
    K_SRC, k_stride, V_SRC, v_stride, MOD, p0, K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN, bh,
    L: tl.constexpr, S: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr,
):
    """Tokens p0 .. p0+G-1 (p0 % G == 0) of one (slot, kv head), token p read at
    K_SRC + (p % MOD) * k_stride (and V's), into the store of (slot, kv head) bh."""
    dtype = K_SCALE.dtype.element_ty
    PW: tl.constexpr = 32 // BITS_K
    W: tl.constexpr = D // PW
    pos = p0 + tl.arange(0, G)[:, None]  # [G, 1]
    channel = tl.arange(0, D)[None, :]
    # a [G, D] tile keeps the channels contiguous in a thread and the tokens across few
    # lanes: the per-channel reductions stay mostly in registers
    k = tl.load(K_SRC + (pos % MOD) * k_stride + channel).to(tl.float32)  # [G, D]
    if S > 0:
        k_first = tl.load(K_SRC + ((p0 + S) % MOD) * k_stride + channel).to(tl.float32)  # [1, D]
        k = tl.where(pos < S, k_first, k)
    lo = tl.min(k, 0)[None, :]
    hi = tl.max(k, 0)[None, :]
    codes, scale, k_min = _quantize(k, lo, hi, BITS_K, dtype)
    words = tl.reduce(tl.reshape(codes, [G, W, PW]) << _pair_shifts(PW, BITS_K)[None, None, :], 2, _bit_or)  # [G, W]
    tok = bh * L + p0 + tl.arange(0, G)[:, None]  # [G, 1]
    tl.store(K_PACKED + tok * W + tl.arange(0, W)[None, :], words)
    sc = bh * (L // G) * D + p0 // G * D + tl.arange(0, D)
    tl.store(K_SCALE + sc, tl.reshape(scale, [D]))
    tl.store(K_MIN + sc, tl.reshape(k_min, [D]))

    SPW: tl.constexpr = 16 // BITS_V
    NGV: tl.constexpr = D // G
    P: tl.constexpr = G // 2
    pair = tl.arange(0, P)[:, None, None, None, None]
    u = tl.arange(0, 2)[None, :, None, None, None]
    g = tl.arange(0, NGV)[None, None, :, None, None]
    a = tl.arange(0, G // 8)[None, None, None, :, None]
    cls = tl.arange(0, 8)[None, None, None, None, :]
    v = tl.load(V_SRC + ((p0 + 2 * pair + u) % MOD) * v_stride + g * G + a * 8 + cls).to(tl.float32)
    lo = tl.min(tl.min(v, 4), 3)[:, :, :, None, None]
    hi = tl.max(tl.max(v, 4), 3)[:, :, :, None, None]
    codes, scale, v_min = _quantize(v, lo, hi, BITS_V, dtype)  # codes [P, 2, NGV, G / 8, 8]
    codes = tl.reshape(tl.permute(codes, (0, 4, 2, 3, 1)), [P, D // SPW, SPW, 2])
    slot = tl.arange(0, SPW)[None, None, :, None]
    token = tl.arange(0, 2)[None, None, None, :]
    words = tl.reduce(tl.reduce(codes << (BITS_V * slot + 16 * token), 3, _bit_or), 2, _bit_or)  # [P, D / SPW]
    pair_words = (bh * L + p0) * (D * BITS_V // 32) + tl.arange(0, P)[:, None] * (D // SPW)
    tl.store(V_PACKED + pair_words + tl.arange(0, D // SPW)[None, :], words)
    sc = (bh * NGV + tl.arange(0, NGV)[None, :]) * L + p0 + tl.arange(0, G)[:, None]  # [G, NGV]: group-major rows
    tl.store(V_SCALE + sc, tl.reshape(scale, [G, NGV]))
    tl.store(V_MIN + sc, tl.reshape(v_min, [G, NGV]))


@triton.jit
def _flush_kernel(
    K_RING, V_RING, K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN, LENGTHS,
    H: tl.constexpr, L: tl.constexpr, R: tl.constexpr, S: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    BITS_K: tl.constexpr, BITS_V: tl.constexpr,
):
    pid = tl.program_id(0)
    length = tl.load(LENGTHS + pid // H)
    if (length >= R) & ((length - R) % G == 0):
        bh = pid.to(tl.int64)
        ring = bh * R * D
        _quantize_group(K_RING + ring, D, V_RING + ring, D, R, length - R,
                        K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN, bh, L, S, D, G, BITS_K, BITS_V)


@triton.jit
def _prompt_kernel(
    K, V, PROMPTS, K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN, sk_t, sk_h, sv_t, sv_h, N,
    H: tl.constexpr, L: tl.constexpr, S: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    BITS_K: tl.constexpr, BITS_V: tl.constexpr,
):
    pid = tl.program_id(0)
    prompt = PROMPTS + (pid // H) * 3  # (first packed token, slot, tokens to quantize)
    p0 = tl.program_id(1).to(tl.int64) * G  # int64 positions: token offsets are p * stride
    if p0 < tl.load(prompt + 2):
        h = (pid % H).to(tl.int64)
        first = tl.load(prompt).to(tl.int64)
        bh = tl.load(prompt + 1).to(tl.int64) * H + h
        _quantize_group(K + first * sk_t + h * sk_h, sk_t, V + first * sv_t + h * sv_h, sv_t, N, p0,
                        K_PACKED, K_SCALE, K_MIN, V_PACKED, V_SCALE, V_MIN, bh, L, S, D, G, BITS_K, BITS_V)


def _check_store(bufs: tuple[Tensor, ...], n_sink: int, group_size: int) -> None:
    D = bufs[-1].shape[2] * group_size  # v_min [B, H, D / G, L]
    if not all(t.is_contiguous() for t in bufs):
        raise ValueError("cache buffers must be contiguous")
    if n_sink >= group_size:
        raise ValueError(f"{n_sink} sinks do not fit in the first group of {group_size} tokens")
    if D & (D - 1) or group_size & (group_size - 1):
        raise ValueError(f"head_dim {D} and group size {group_size} must be powers of two for the Triton kernels")


def flush(
    k_ring: Tensor, v_ring: Tensor,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    lengths: Tensor, bits_k: int, bits_v: int, group_size: int, n_sink: int,
) -> None:
    """Triton implementation of kernels.reference.flush_reference (same arguments; buffers
    contiguous, lengths int32)."""
    B, H, R, D = k_ring.shape
    _check_store((k_ring, v_ring, k_packed, k_scale, k_min, v_packed, v_scale, v_min), n_sink, group_size)
    _flush_kernel[(B * H,)](
        k_ring, v_ring, k_packed, k_scale, k_min, v_packed, v_scale, v_min, lengths,
        H=H, L=k_packed.shape[2], R=R, S=n_sink, D=D, G=group_size, BITS_K=bits_k, BITS_V=bits_v,
    )


def quantize_prompt(
    k: Tensor, v: Tensor, prompts: Tensor, longest: int,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    bits_k: int, bits_v: int, group_size: int, n_sink: int,
) -> None:
    """Triton implementation of kernels.reference.quantize_prompt_reference (same arguments;
    store buffers contiguous, k and v with a dense last dim)."""
    N, H, D = k.shape
    _check_store((k_packed, k_scale, k_min, v_packed, v_scale, v_min), n_sink, group_size)
    if v.shape != k.shape or (H, D) != (k_scale.shape[1], k_scale.shape[3]):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match a store of {H} heads of {D}")
    if not k.dtype == v.dtype == k_scale.dtype:
        raise ValueError(f"k and v ({k.dtype}, {v.dtype}) must have the store's dtype {k_scale.dtype}")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("k and v need a dense last dim")
    if longest % group_size != 0 or not 0 <= longest <= min(N, k_packed.shape[2]):
        raise ValueError(f"{longest} prompt tokens are not whole groups of {group_size} within {k_packed.shape[2]}")
    if prompts.dim() != 2 or prompts.shape[1] != 3 or prompts.dtype != torch.int32 or prompts.device != k.device:
        raise ValueError(f"prompts must be int32 rows (first token, slot, count) on {k.device}, "
                         f"got {prompts.dtype} {tuple(prompts.shape)}")
    if prompts.shape[0] == 0 or longest == 0:
        return
    _prompt_kernel[(prompts.shape[0] * H, longest // group_size)](
        k, v, prompts.contiguous(), k_packed, k_scale, k_min, v_packed, v_scale, v_min,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), N,
        H=H, L=k_packed.shape[2], S=n_sink, D=D, G=group_size, BITS_K=bits_k, BITS_V=bits_v,
    )
