"""Cache ops registered with torch.library, so that model code calls one API on every
device and torch.compile sees them as known mutations:

    torch.ops.kivi.decode_attention(q, k_ring, v_ring, k_sink, v_sink, k_packed, k_scale, k_min,
        v_packed, v_scale, v_min, lengths, n_quantized, bits_k, bits_v, group_size, sm_scale) -> out
    torch.ops.kivi.flush(k_ring, v_ring, k_packed, k_scale, k_min, v_packed, v_scale, v_min,
        lengths, bits_k, bits_v, group_size, n_sink)   mutates the packed stores

The default implementation is the pure-PyTorch reference (kernels/reference.py); CUDA
tensors go to the Triton kernels.
"""

import torch
from torch import Tensor

from kernels.reference import decode_attention_reference, flush_reference


@torch.library.custom_op("kivi::decode_attention", mutates_args=())
def decode_attention(
    q: Tensor, k_ring: Tensor, v_ring: Tensor, k_sink: Tensor, v_sink: Tensor,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    lengths: Tensor, n_quantized: Tensor, bits_k: int, bits_v: int, group_size: int, sm_scale: float,
) -> Tensor:
    return decode_attention_reference(
        q, k_ring, v_ring, k_sink, v_sink, k_packed, k_scale, k_min, v_packed, v_scale, v_min,
        lengths, n_quantized, bits_k, bits_v, group_size, sm_scale,
    )


@decode_attention.register_fake
def _(q: Tensor, *args, **kwargs) -> Tensor:
    return torch.empty_like(q)


@torch.library.custom_op(
    "kivi::flush", mutates_args=("k_packed", "k_scale", "k_min", "v_packed", "v_scale", "v_min")
)
def flush(
    k_ring: Tensor, v_ring: Tensor,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    lengths: Tensor, bits_k: int, bits_v: int, group_size: int, n_sink: int,
) -> None:
    flush_reference(k_ring, v_ring, k_packed, k_scale, k_min, v_packed, v_scale, v_min,
                    lengths, bits_k, bits_v, group_size, n_sink)


@flush.register_fake
def _(*args, **kwargs) -> None:
    return None
