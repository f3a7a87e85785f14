"""KIVI reference quantization: asymmetric min/max groups, and bit packing.

Keys are quantized per-channel (a group is G consecutive tokens of one channel), values
per-token (a group is G consecutive channels of one token). Each group stores its codes
plus `scale` and `min` in the model dtype:

    scale = (max - min) / (2^bits - 1)
    code  = clamp(round((x - min) / scale), 0, 2^bits - 1)
    x_hat = code * scale + min

A constant group (max == min) has scale 0: codes are 0 and x_hat == min exactly.

Packing. Codes live in int32 words, `per_word = 32 // bits` codes a word. An axis of
length N is packed into N / per_word words with a *strided* order:

    word[i] = sum_j code[i + j * (N / per_word)] << (j * bits),   j = 0 .. per_word-1

so unpacking a tile of words [N / per_word, ...] with the shifts j * bits gives
[per_word, N / per_word, ...], which reshapes to [N, ...] in natural order (what the
Triton decode kernel does). Codes are clamped before packing, so a code never spills into
its neighbour's bits; the sign bit of a word may be set (bits 31:30 hold code j = 15 at
2 bits): unpack masks after an arithmetic shift.

Layouts in the cache (per layer, B slots, H kv heads, L = max_seq_len, D = head_dim):
    k_packed [B, H, L * bits_k / 32, D]  int32: per group of G tokens, G / per_word rows,
                                          packed along tokens (strided within the group)
    k_scale, k_min [B, H, L / G, D]      model dtype, one per (group, channel)
    v_packed [B, H, L, D * bits_v / 32]  int32: per token, packed along channels (strided
                                          across the whole head_dim)
    v_scale, v_min [B, H, L, D / G]      model dtype, one per (token, channel group)
Rows of k_packed are contiguous over D (coalesced loads of a [rows, D] tile); a token's
v_packed row is D * bits / 32 contiguous words.
"""

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}: choose one of {SUPPORTED_BITS}")


def quantize(x: Tensor, bits: int, group_size: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Min/max quantize `x` in groups of `group_size` consecutive elements along `dim`.

    Returns (codes, scale, min): codes have x's shape (uint8), scale and min have x's shape
    with `dim` divided by `group_size`, in x's dtype. Statistics are computed in float32.
    """
    check_bits(bits)
    dim = dim % x.dim()
    n = x.shape[dim]
    if n % group_size != 0:
        raise ValueError(f"axis of length {n} is not a multiple of the group size {group_size}")
    grouped = x.float().unflatten(dim, (n // group_size, group_size))  # [..., n/G, G, ...]
    x_min = grouped.amin(dim=dim + 1, keepdim=True)
    x_max = grouped.amax(dim=dim + 1, keepdim=True)
    max_code = 2**bits - 1
    # Round the statistics to the storage dtype first so that dequantization with the
    # stored values reproduces the codes' intended grid.
    x_min = x_min.to(x.dtype).float()
    # a tensor divisor: CUDA divides by a Python number as a multiply by its rounded inverse,
    # which is not the IEEE quotient the kernels compute
    scale = ((x_max - x_min) / torch.full((), max_code, dtype=torch.float32, device=x.device)).to(x.dtype).float()
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((grouped - x_min) / safe_scale).round_().clamp_(0, max_code)
    codes = torch.where(scale > 0, codes, torch.zeros_like(codes))
    return (
        codes.flatten(dim, dim + 1).to(torch.uint8),
        scale.squeeze(dim + 1).to(x.dtype),
        x_min.squeeze(dim + 1).to(x.dtype),
    )


def dequantize(codes: Tensor, scale: Tensor, x_min: Tensor, group_size: int, dim: int) -> Tensor:
    """Inverse of `quantize`: codes * scale + min, in scale's dtype (computed in float32)."""
    dim = dim % codes.dim()
    scale_full = scale.float().repeat_interleave(group_size, dim=dim)
    min_full = x_min.float().repeat_interleave(group_size, dim=dim)
    return (codes.float() * scale_full + min_full).to(scale.dtype)


def pack(codes: Tensor, bits: int, dim: int) -> Tensor:
    """Pack codes (values < 2^bits) along `dim` into int32 words, strided order (see top)."""
    check_bits(bits)
    dim = dim % codes.dim()
    per_word = 32 // bits
    n = codes.shape[dim]
    if n % per_word != 0:
        raise ValueError(f"axis of length {n} is not a multiple of {per_word} codes per word")
    chunks = codes.long().clamp(0, 2**bits - 1).unflatten(dim, (per_word, n // per_word))
    shifts = torch.arange(0, 32, bits, device=codes.device).view(-1, *[1] * (codes.dim() - dim))
    # The shifted codes' bits are disjoint, so their int64 sum is their OR (< 2^32); the cast
    # keeps the low 32 bits (a set bit 31 reads as a negative int32). One kernel, not a loop.
    return (chunks << shifts).sum(dim).to(torch.int32)


def unpack(words: Tensor, bits: int, dim: int) -> Tensor:
    """Inverse of `pack`: int32 words -> uint8 codes, `dim` grows by 32 // bits."""
    check_bits(bits)
    dim = dim % words.dim()
    per_word = 32 // bits
    mask = 2**bits - 1
    chunks = [(words >> (j * bits)) & mask for j in range(per_word)]
    return torch.stack(chunks, dim=dim).flatten(dim, dim + 1).to(torch.uint8)


def quantize_keys(k: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel key quantization of whole groups of tokens.

    k [..., T, D] with T a multiple of G -> (packed [..., T * bits / 32, D] int32,
    scale [..., T / G, D], min [..., T / G, D]). Packing is strided within each group.
    """
    codes, scale, k_min = quantize(k, bits, group_size, dim=-2)
    grouped = codes.unflatten(-2, (-1, group_size))  # [..., T/G, G, D]
    packed = pack(grouped, bits, dim=-2).flatten(-3, -2)  # [..., T/G * G/per_word, D]
    return packed, scale, k_min


def dequantize_keys(packed: Tensor, scale: Tensor, k_min: Tensor, bits: int, group_size: int) -> Tensor:
    """Inverse of `quantize_keys`: [..., T * bits / 32, D] -> [..., T, D] in scale's dtype."""
    rows_per_group = group_size * bits // 32
    codes = unpack(packed.unflatten(-2, (-1, rows_per_group)), bits, dim=-2).flatten(-3, -2)
    return dequantize(codes, scale, k_min, group_size, dim=-2)


def quantize_values(v: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token value quantization: v [..., T, D] -> (packed [..., T, D * bits / 32] int32,
    scale [..., T, D / G], min [..., T, D / G])."""
    codes, scale, v_min = quantize(v, bits, group_size, dim=-1)
    return pack(codes, bits, dim=-1), scale, v_min


def dequantize_values(packed: Tensor, scale: Tensor, v_min: Tensor, bits: int, group_size: int) -> Tensor:
    """Inverse of `quantize_values`: [..., T, D * bits / 32] -> [..., T, D]."""
    return dequantize(unpack(packed, bits, dim=-1), scale, v_min, group_size, dim=-1)
