"""The model's elementwise chains as one Triton kernel each, for its eager forward on the GPU
(prefill above all). Eager PyTorch runs every op of a chain as its own pass over a
[tokens, width] tensor: RoPE on q and k took seven passes over float32 copies of them, RMSNorm
four, SwiGLU three. Each kernel here reads its inputs once and writes its output once, with
the arithmetic of model.py (its reference): float32 inside, rounded to the input dtype where
the model rounds. A compiled step does not call them: Inductor fuses the same chains itself.

  rope(x, cos, sin): x [B, T, heads, D] (any strides, D dense), cos and sin [1 or B, T, 1, D]
    float32 -> [B, T, heads, D] contiguous, x * cos + swap_halves(x) * sin.
    Grid (B * T, heads / BLOCK_H): one program per token and block of heads, tile [BLOCK_H, D].
  rms_norm(x, weight, eps): x [..., dim] -> (x * rsqrt(mean(x^2) + eps)).to(dtype) * weight.
    Grid (rows,): one program per row, the whole row in one tile.
  swiglu(h): h [..., 2 * I] (gate | up) -> silu(gate).to(dtype) * up [..., I].
    Grid (rows, I / BLOCK_I).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_H = 16  # heads a RoPE program rotates
BLOCK_I = 1024  # SwiGLU outputs a program writes


@triton.jit
def _rope_kernel(X, x_stride_b, x_stride_t, x_stride_h, COS, SIN, cs_stride_b, cs_stride_t, OUT, T, HEADS,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    tl.static_assert(D % 2 == 0)
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    b, t = row // T, row % T
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    live = (h < HEADS) & (d < D)
    x_head = X + b * x_stride_b + t * x_stride_t + h * x_stride_h
    x = tl.load(x_head + d, live).to(tl.float32)
    x_swapped = tl.load(x_head + (d + D // 2) % D, live).to(tl.float32)  # [x2, x1]
    angle = b * cs_stride_b + t * cs_stride_t + d
    cos = tl.load(COS + angle, d < D)
    sin = tl.load(SIN + angle, d < D)
    tl.store(OUT + (row * HEADS + h) * D + d, (x * cos + x_swapped * sin).to(OUT.dtype.element_ty), live)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    B, T, heads, D = x.shape
    assert x.stride(-1) == 1 and cos.stride() == sin.stride() and cos.dtype == sin.dtype == torch.float32
    out = torch.empty(B, T, heads, D, device=x.device, dtype=x.dtype)
    cs_stride_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope_kernel[(B * T, triton.cdiv(heads, BLOCK_H))](
        x, x.stride(0), x.stride(1), x.stride(2), cos, sin, cs_stride_b, cos.stride(1), out, T, heads,
        D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_H=BLOCK_H,
    )
    return out


@triton.jit
def _rms_norm_kernel(X, x_stride, WEIGHT, OUT, eps, DIM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    x = tl.load(X + row * x_stride + i, i < DIM, other=0.0).to(tl.float32)
    normed = x * tl.math.rsqrt(tl.sum(x * x, 0) / DIM + eps)
    weight = tl.load(WEIGHT + i, i < DIM)
    tl.store(OUT + row * DIM + i, normed.to(OUT.dtype.element_ty) * weight, i < DIM)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)  # a view where the rows have one stride (a copy for q/k head slices)
    assert rows.stride(-1) == 1 and weight.dtype == x.dtype
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(rows.shape[0],)](rows, rows.stride(0), weight, out, eps, DIM=dim, BLOCK=block,
                                       num_warps=8 if block >= 4096 else 4)
    return out


@triton.jit
def _swiglu_kernel(H, OUT, I, BLOCK_I: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    gate = tl.load(H + row * 2 * I + j, j < I).to(tl.float32)
    up = tl.load(H + row * 2 * I + I + j, j < I)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    tl.store(OUT + row * I + j, silu * up, j < I)


def swiglu(h: Tensor) -> Tensor:
    assert h.is_contiguous() and h.shape[-1] % 2 == 0
    I = h.shape[-1] // 2
    out = torch.empty(*h.shape[:-1], I, device=h.device, dtype=h.dtype)
    _swiglu_kernel[(h.numel() // (2 * I), triton.cdiv(I, BLOCK_I))](h, out, I, BLOCK_I=BLOCK_I)
    return out
