"""Memory planner: bytes per sequence for a model, cache mode and context, and the largest
batch that fits beside the weights. Every script that takes `--batch-size auto` calls
`max_batch_size`.

Per sequence: its cache slot (exactly what the cache buffers allocate, all layers) plus
its decode activations (hidden states, MLP, float32 logits and sampling temporaries, the
attention kernel's per-split partial results). Fixed: the weights, and a workspace for
prefill (PREFILL_TOKENS tokens through one layer at a time, and the KIVI quantization of
their keys and values in float32).
"""

import math
import os

import torch

from checkpoint import expected_shapes
from kivi_cache import CacheConfig, cache_bytes
from model import ModelArgs

PREFILL_TOKENS = 8192  # tokens per prefill forward: bounds the prefill workspace
RESERVE_BYTES = 1 << 30  # allocator fragmentation and CUDA-graph pools, kept free


def cache_slot_bytes(args: ModelArgs, cache: CacheConfig, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of one cache slot, all layers: exactly what the cache buffers hold."""
    return args.n_layers * cache_bytes(cache.kv, args.n_kv_heads, args.head_dim, seq_len, dtype,
                                       cache.group_size, cache.residual_len, cache.n_sink)


def decode_activation_bytes(args: ModelArgs, seq_len: int, dtype: torch.dtype) -> int:
    el = torch.empty(0, dtype=dtype).element_size()
    hidden = (6 * args.dim + (args.n_heads + 2 * args.n_kv_heads) * args.head_dim + 3 * args.intermediate_size) * el
    logits = 8 * args.vocab_size * 4  # float32 logits, softmax, sort and sampling temporaries
    splits = -(-seq_len // 256)  # the decode kernel's partial (out, max, sum) per split and head
    attention = splits * args.n_heads * (args.head_dim + 2) * 4
    return hidden + logits + attention


def sequence_bytes(args: ModelArgs, cache: CacheConfig, seq_len: int, dtype: torch.dtype) -> int:
    return cache_slot_bytes(args, cache, seq_len, dtype) + decode_activation_bytes(args, seq_len, dtype)


def weight_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    el = torch.empty(0, dtype=dtype).element_size()
    return sum(math.prod(shape) for shape in expected_shapes(args).values()) * el


def workspace_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    el = torch.empty(0, dtype=dtype).element_size()
    kv_dim = args.n_kv_heads * args.head_dim
    per_token = (4 * args.dim + (args.n_heads + 2 * args.n_kv_heads) * args.head_dim + 4 * args.intermediate_size) * el
    quantize = 12 * kv_dim * 4  # float32 copies of k and v while they are quantized
    return PREFILL_TOKENS * (per_token + quantize) + args.vocab_size * args.dim * 4


def planned_bytes(args: ModelArgs, cache: CacheConfig, seq_len: int, dtype: torch.dtype, batch_size: int) -> int:
    """Peak device memory the planner expects for a batch: weights, workspace, reserve and
    the sequences."""
    fixed = weight_bytes(args, dtype) + workspace_bytes(args, dtype) + RESERVE_BYTES
    return fixed + batch_size * sequence_bytes(args, cache, seq_len, dtype)


def max_batch_size(args: ModelArgs, cache: CacheConfig, seq_len: int, dtype: torch.dtype, budget_bytes: int) -> int:
    """The largest batch whose planned bytes fit in budget_bytes (0 if not even one does)."""
    free = budget_bytes - planned_bytes(args, cache, seq_len, dtype, 0)
    return max(0, free // sequence_bytes(args, cache, seq_len, dtype))


def device_budget(device: torch.device) -> int:
    """Memory the planner may fill: the device's total on CUDA, less what other processes
    hold (this process's cached allocator blocks count as its own); on CPU, the machine's
    available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
