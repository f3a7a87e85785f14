"""Cache ops registered with torch.library, so that model code calls one API on every
device and torch.compile sees them as known mutations:

    torch.ops.kivi.decode_attention(q, k_ring, v_ring, k_sink, v_sink, k_packed, k_scale, k_min,
        v_packed, v_scale, v_min, lengths, n_quantized, bits_k, bits_v, group_size, sm_scale,
        window=0) -> out   (window > 0: each slot's last `window` positions only)
    torch.ops.kivi.flush(k_ring, v_ring, k_packed, k_scale, k_min, v_packed, v_scale, v_min,
        lengths, bits_k, bits_v, group_size, n_sink)   mutates the packed stores
    torch.ops.kivi.append(k_ring, v_ring, k, v, input_pos)   ring[b, :, input_pos[b] % R] = k[b]
    torch.ops.kivi.quantize_prompt(k, v, prompts, longest, k_packed, k_scale, k_min, v_packed, v_scale,
        v_min, bits_k, bits_v, group_size, n_sink)   prefill: the whole groups of prompts packed
        along one token axis, k, v [N, H, D], prompts [n, 3] int32 (first token, slot, count),
        into the store, mutates it

The cache calls them through `call` (below), which skips the op dispatch in eager mode on
the CPU. (The Python names end in _op so that they do not shadow the kernel modules.) The default
implementation is the pure-PyTorch reference (kernels/reference.py); CUDA
tensors go to the Triton and Gluon kernels (kernels/decode_attention.py, which reads the
packed store on the tensor cores through kernels/mma_attention.py where it serves, and
kernels/quantize.py). kernels/pointwise.py holds no op: its elementwise kernels (RoPE, RMSNorm,
SwiGLU) are called by the model's eager forward on the GPU directly.
"""

import torch
from torch import Tensor

from kernels.decode_attention import decode_attention as decode_attention_triton
from kernels.quantize import flush as flush_triton
from kernels.quantize import quantize_prompt as quantize_prompt_triton
from kernels.reference import append_reference, decode_attention_reference, flush_reference, quantize_prompt_reference


@torch.library.custom_op("kivi::decode_attention", mutates_args=())
def decode_attention_op(
    q: Tensor, k_ring: Tensor, v_ring: Tensor, k_sink: Tensor, v_sink: Tensor,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    lengths: Tensor, n_quantized: Tensor, bits_k: int, bits_v: int, group_size: int, sm_scale: float,
    window: int = 0,
) -> Tensor:
    return decode_attention_reference(
        q, k_ring, v_ring, k_sink, v_sink, k_packed, k_scale, k_min, v_packed, v_scale, v_min,
        lengths, n_quantized, bits_k, bits_v, group_size, sm_scale, window,
    )


@decode_attention_op.register_fake
def _(q: Tensor, *args, **kwargs) -> Tensor:
    return torch.empty_like(q)


decode_attention_op.register_kernel("cuda")(decode_attention_triton)


STORE = ("k_packed", "k_scale", "k_min", "v_packed", "v_scale", "v_min")  # what flush and prefill write


@torch.library.custom_op("kivi::flush", mutates_args=STORE)
def flush_op(
    k_ring: Tensor, v_ring: Tensor,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    lengths: Tensor, bits_k: int, bits_v: int, group_size: int, n_sink: int,
) -> None:
    flush_reference(k_ring, v_ring, k_packed, k_scale, k_min, v_packed, v_scale, v_min,
                    lengths, bits_k, bits_v, group_size, n_sink)


@flush_op.register_fake
def _(*args, **kwargs) -> None:
    return None


flush_op.register_kernel("cuda")(flush_triton)


@torch.library.custom_op("kivi::quantize_prompt", mutates_args=STORE)
def quantize_prompt_op(
    k: Tensor, v: Tensor, prompts: Tensor, longest: int,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    bits_k: int, bits_v: int, group_size: int, n_sink: int,
) -> None:
    quantize_prompt_reference(k, v, prompts, longest, k_packed, k_scale, k_min, v_packed, v_scale, v_min,
                              bits_k, bits_v, group_size, n_sink)


@quantize_prompt_op.register_fake
def _(*args, **kwargs) -> None:
    return None


quantize_prompt_op.register_kernel("cuda")(quantize_prompt_triton)


@torch.library.custom_op("kivi::append", mutates_args=("k_ring", "v_ring"))
def append_op(k_ring: Tensor, v_ring: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> None:
    """An opaque op: compiled as an in-place index_put, Inductor's functional form copied the
    whole cache every step."""
    append_reference(k_ring, v_ring, k, v, input_pos)


@append_op.register_fake
def _(*args, **kwargs) -> None:
    return None


_REFERENCE = {"decode_attention": decode_attention_reference, "flush": flush_reference, "append": append_reference}


def call(name: str, *args):
    """torch.ops.kivi.<name>(*args), except in eager mode on the CPU, where the reference is
    called directly: there the op's dispatch (schema checks, mutation bookkeeping) costs more
    than the work at batch 1 (three calls a layer a token)."""
    if args[0].is_cpu and not torch.compiler.is_compiling():
        return _REFERENCE[name](*args)
    return getattr(torch.ops.kivi, name)(*args)
