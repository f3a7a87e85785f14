"""kernels/pointwise.py against model.py's PyTorch, computed on the CPU (the model takes the
kernels only for CUDA tensors): RoPE on a strided q/k view with per-batch and broadcast angles,
RMSNorm on rows and on head slices, SwiGLU at widths off the block size. Without CUDA the
kernels run under the Triton interpreter (conftest.py)."""

import pytest
import torch

from kernels import pointwise
from model import RMSNorm, apply_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter rounds fp32 -> bf16 by truncation; fp32 and fp16 round as torch does
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())
# about two units in the last place: the GPU's exp and fused multiply-adds round differently
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out.cpu(), ref, rtol=RTOL[ref.dtype], atol=1e-5)


def angles(B: int, T: int, D: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, 1, D] float32 in model.Transformer.rope's layout, random angles."""
    a = torch.rand(B, T, 1, D // 2, generator=g) * 100
    return torch.cat([a.cos(), a.cos()], -1), torch.cat([-a.sin(), a.sin()], -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, cs_batch, heads, D", [(2, 2, 19, 64), (2, 1, 12, 128), (1, 1, 3, 64)])
def test_rope_on_strided_qk(dtype, B, cs_batch, heads, D):
    g = torch.Generator().manual_seed(heads)
    T, v_width = 5, 2 * D
    qkv = torch.randn(B, T, heads * D + v_width, generator=g).to(dtype)
    qk = qkv[..., : heads * D].view(B, T, heads, D)  # rows strided as in Attention.forward
    cos, sin = angles(cs_batch, T, D, g)
    out = pointwise.rope(qk.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE))
    assert out.is_contiguous() and out.dtype == dtype
    assert_close(out, apply_rope(qk, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rows_and_head_slices(dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data = torch.rand(576, generator=g).to(dtype) + 0.5
    x = (torch.randn(3, 7, 576, generator=g) * 4).to(dtype)
    assert_close(pointwise.rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), 1e-5), norm(x))
    head_norm = RMSNorm(64, 1e-6).to(dtype)
    qk = torch.randn(2, 5, 11, 64, generator=g).to(dtype)[:, :, :8]  # q heads of a q/k view
    assert_close(pointwise.rms_norm(qk.to(DEVICE), head_norm.weight.to(DEVICE), 1e-6), head_norm(qk))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("I", [1536, 100])
def test_swiglu(dtype, I):
    g = torch.Generator().manual_seed(I)
    h = (torch.randn(2, 3, 2 * I, generator=g) * 3).to(dtype)
    gate, up = h.chunk(2, dim=-1)
    assert_close(pointwise.swiglu(h.to(DEVICE)), torch.nn.functional.silu(gate) * up)
