"""KIVI reference quantization: asymmetric min/max groups, and bit packing.

Keys are quantized per-channel (a group is G consecutive tokens of one channel), values
per-token (a group is G consecutive channels of one token). Each group stores its codes
plus `scale` and `min` in the model dtype:

    scale = (max - min) / (2^bits - 1)
    code  = clamp(round((x - min) * (1 / scale)), 0, 2^bits - 1)   (1 / scale in float32, the
            product rounded once, half to even)
    x_hat = code * scale + min

A constant group (max == min) has scale 0: codes are 0 and x_hat == min exactly.

Packing. Codes live in int32 words, `per_word = 32 // bits` codes a word, and are laid out
for the tensor-core decode kernel (kernels/mma_attention.py): a word is two 16-bit halves,
and the codes come in pairs, one in each half at the same offset, so that masking a word in
place gives two 16-bit floats whose mantissas are the two codes. An axis of length N is
packed into N / per_word words, each holding per_word consecutive positions:

    word[w] = sum_i code[w * per_word + i] << (bits * (i // 2) + 16 * (i % 2))

(even positions fill the low half, odd ones the high half). Codes are clamped before
packing, so a code never spills into its neighbour's bits; bit 31 may be set (a code in the
top of the high half): unpack masks after an arithmetic shift.

Layouts in the cache (per layer, B slots, H kv heads, L = max_seq_len, D = head_dim,
W = D * bits / 32 words a token):
    k_packed [B, H, L, W]        int32: per token, the D channels packed as above
    k_scale, k_min [B, H, L / G, D]   model dtype, one per (group of G tokens, channel)
    v_packed [B, H, L, W]        int32: per token PAIR (2p, 2p+1), rows 2p and 2p+1 are one
                                 run of 2W words of SPW = 16 / bits slots each; channel c is
                                 slot n = (c % 8) * D / 8 + c // 8 of the run (word n // SPW,
                                 slot k = n % SPW), token 2p's code at bits * k, token 2p+1's
                                 at bits * k + 16
    v_scale, v_min [B, H, D / G, L]   model dtype, one per (group of G channels, token): a
                                 group's row of tokens, so that a token pair's two scales
                                 (or mins) are one 32-bit word, as the value product reads them
The key pairs are neighbouring channels (the K axis of the score product), the value pairs
neighbouring tokens (the K axis of the value product); a lane of the MMA fragments reads
its words as one contiguous run (channel class c % 8 is one lane's rows). Values need pairs
of tokens and D a multiple of 8.
"""

import functools

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
    # codes: the product of x - min and the float32 inverse of the scale, rounded once (half to
    # even); the product of two float32 numbers is exact in float64, and a kernel gets the same
    # rounding from one fused multiply-add
    inverse = torch.reciprocal(torch.where(scale > 0, scale, torch.ones_like(scale)))
    codes = ((grouped - x_min).double() * inverse.double()).round_().clamp_(0, max_code)
    codes = torch.where(scale > 0, codes, torch.zeros_like(codes))
    return (
        codes.flatten(dim, dim + 1).to(torch.uint8),
        scale.squeeze(dim + 1).to(x.dtype),
        x_min.squeeze(dim + 1).to(x.dtype),
    )


def dequantize(codes: Tensor, scale: Tensor, x_min: Tensor, group_size: int, dim: int,
               out: Tensor | None = None) -> Tensor:
    """Inverse of `quantize`: codes * scale + min, in scale's dtype (computed in float32).
    out: a float32 tensor (a view of a larger one, say) to write the result into, which the
    result then is; only with float32 scales, where no rounding follows the float32 math."""
    dim = dim % codes.dim()
    # scale and min broadcast over each group
    grouped, scale, x_min = codes.unflatten(dim, (-1, group_size)), scale.unsqueeze(dim + 1), x_min.unsqueeze(dim + 1)
    if out is not None:
        if scale.dtype != torch.float32 or out.dtype != torch.float32:
            raise ValueError(f"dequantize into a tensor: float32 scales and out only, got {scale.dtype}, {out.dtype}")
        torch.addcmul(x_min, grouped, scale, out=out.unflatten(dim, (-1, group_size)))  # integer codes convert exactly
        return out
    x = torch.addcmul(x_min.float(), grouped.float(), scale.float())
    return x.flatten(dim, dim + 1).to(scale.dtype)


def pack(codes: Tensor, bits: int, dim: int) -> Tensor:
    """Pack codes (values < 2^bits) along `dim` into int32 words, pairs in the halves (see top)."""
    check_bits(bits)
    dim = dim % codes.dim()
    per_word = 32 // bits
    n = codes.shape[dim]
    if n % per_word != 0:
        raise ValueError(f"axis of length {n} is not a multiple of {per_word} codes per word")
    chunks = codes.long().clamp(0, 2**bits - 1).unflatten(dim, (n // per_word, per_word))
    shifts = _shifts(bits, codes.device).view(-1, *[1] * (codes.dim() - dim - 1))
    # The shifted codes' bits are disjoint, so their int64 sum is their OR (< 2^32); the cast
    # keeps the low 32 bits (a set bit 31 reads as a negative int32). One kernel, not a loop.
    return (chunks << shifts).sum(dim + 1).to(torch.int32)


def unpack(words: Tensor, bits: int, dim: int) -> Tensor:
    """Inverse of `pack`: int32 words -> uint8 codes, `dim` grows by 32 // bits."""
    return _unpack_int32(words, bits, dim).to(torch.uint8)


def _unpack_int32(words: Tensor, bits: int, dim: int) -> Tensor:
    """`unpack`'s codes as the int32 of the shifts (no conversion: dequantize takes them as they are)."""
    check_bits(bits)
    dim = dim % words.dim()
    shifts = _shifts(bits, words.device).view(-1, *[1] * (words.dim() - dim - 1))  # int32 math
    codes = (words.unsqueeze(dim + 1) >> shifts) & (2**bits - 1)
    return codes.flatten(dim, dim + 1)


@functools.cache
def _shifts(bits: int, device: torch.device) -> Tensor:
    """Bit offset of position i of a word: bits * (i // 2) + 16 * (i % 2), int32 (made once a
    device: at batch-1 decode on the CPU its five small ops cost more than the unpacking)."""
    i = torch.arange(32 // bits, device=device, dtype=torch.int32)
    return bits * (i // 2) + 16 * (i % 2)


def _value_order(codes: Tensor, bits: int) -> Tensor:
    """[..., T, D] -> [..., T / 2, 2W, 2 * SPW]: per token pair, the codes of each value word
    in packing order (position 2k + u: slot k, token 2p + u; slot n of the pair is channel
    (n % (D / 8)) * 8 + n // (D / 8))."""
    *prefix, T, D = codes.shape
    if T % 2 or D % 8:
        raise ValueError(f"values pack whole token pairs and head_dim a multiple of 8, got {T} tokens of {D}")
    x = codes.unflatten(-1, (D // 8, 8)).unflatten(-3, (T // 2, 2))  # [..., P, u, D / 8, c % 8]
    n = x.dim()
    x = x.permute(*range(n - 4), n - 4, n - 1, n - 2, n - 3).flatten(-3, -2)  # [..., P, slot n, u]
    return x.unflatten(-2, (-1, 16 // bits)).flatten(-2)


@functools.cache
def _value_words(bits: int, D: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Where channel c of a token pair sits in the pair's run of 2W words (see the top): the
    word [D] and, for token u of the pair, the bit offset [2, D] int32 (made once a device)."""
    c = torch.arange(D)
    slot = (c % 8) * (D // 8) + c // 8
    per_half = 16 // bits
    shift = bits * (slot % per_half) + 16 * torch.arange(2)[:, None]
    return (slot // per_half).to(device), shift.to(device=device, dtype=torch.int32)


def quantize_keys(k: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel key quantization of whole groups of tokens.

    k [..., T, D] with T a multiple of G -> (packed [..., T, D * bits / 32] int32,
    scale [..., T / G, D], min [..., T / G, D]).
    """
    codes, scale, k_min = quantize(k, bits, group_size, dim=-2)
    return pack(codes, bits, dim=-1), scale, k_min


def dequantize_keys(packed: Tensor, scale: Tensor, k_min: Tensor, bits: int, group_size: int,
                    out: Tensor | None = None) -> Tensor:
    """Inverse of `quantize_keys`: [..., T, D * bits / 32] -> [..., T, D] in scale's dtype (out:
    as in `dequantize`)."""
    return dequantize(_unpack_int32(packed, bits, dim=-1), scale, k_min, group_size, dim=-2, out=out)


def quantize_values(v: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token value quantization: v [..., T, D] (T even) -> (packed [..., T, D * bits / 32]
    int32 in token pairs, scale [..., D / G, T], min [..., D / G, T])."""
    codes, scale, v_min = quantize(v, bits, group_size, dim=-1)
    *prefix, T, D = v.shape
    words = pack(_value_order(codes, bits), bits, dim=-1)  # [..., T / 2, 2W, 1]
    return words.reshape(*prefix, T, D * bits // 32), scale.mT.contiguous(), v_min.mT.contiguous()


def dequantize_values(packed: Tensor, scale: Tensor, v_min: Tensor, bits: int, group_size: int,
                      out: Tensor | None = None) -> Tensor:
    """Inverse of `quantize_values`: [..., T, D * bits / 32] and scale, min [..., D / G, T] -> [..., T, D]
    (out: as in `dequantize`)."""
    check_bits(bits)
    *prefix, T, W = packed.shape
    word, shift = _value_words(bits, W * 32 // bits, packed.device)
    runs = packed.reshape(*prefix, T // 2, 1, 2 * W)  # a token pair's run of words
    codes = (runs.index_select(-1, word) >> shift) & (2**bits - 1)  # [..., T / 2, 2, D], channels in order
    return dequantize(codes.flatten(-3, -2), scale.mT, v_min.mT, group_size, dim=-1, out=out)
