"""Tensor parallelism over the ranks of a `torchrun` job (torch.distributed: NCCL on CUDA, gloo
on the CPU), Megatron-style:

  - q/k/v rows (whole query heads and whole kv heads) and the MLP's gate/up rows are split
    across ranks, so rank r holds heads r * H / W .. and MLP channels r * I / W ..; each
    rank's KV cache holds only its own kv heads;
  - the output projection and the MLP's down projection are split by columns; their partial
    outputs are summed over the ranks with one all-reduce each (one for both in a parallel
    block), a functional collective, so it stays inside a compiled CUDA graph;
  - embeddings, norms and the output head are replicated: every rank computes the same
    logits, and the engine's counter-based sampler then picks the same token on every rank.

With one process (no WORLD_SIZE above 1) everything here is the identity.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from model import ModelArgs


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init(device_type: str) -> torch.device | None:
    """Join the torchrun job (once) and return this rank's device; None outside torchrun."""
    if world_size() == 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def check(args: ModelArgs, world: int) -> None:
    """One clear error when the world size does not divide what it splits."""
    sizes = {"query heads": args.n_heads, "kv heads": args.n_kv_heads, "MLP width": args.intermediate_size}
    if bad := [f"{name} {n}" for name, n in sizes.items() if n % world]:
        raise ValueError(f"{world} ranks do not divide the model's {', '.join(bad)} (tensor parallelism splits "
                         f"query heads {args.n_heads}, kv heads {args.n_kv_heads} and MLP width "
                         f"{args.intermediate_size} evenly)")


def local_args(args: ModelArgs, world: int) -> ModelArgs:
    """The shapes one rank's layers hold."""
    return replace(args, n_heads=args.n_heads // world, n_kv_heads=args.n_kv_heads // world,
                   intermediate_size=args.intermediate_size // world)


def all_reduce(x: Tensor) -> Tensor:
    """The sum of x over the ranks (x itself with one process)."""
    if world_size() == 1:
        return x
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def row_ranges(name: str, args: ModelArgs, rank: int, world: int) -> list[tuple[int, int]] | None:
    """The rows of tensor `name` (the engine's full-model names) that rank holds, as ranges
    to concatenate; None for a tensor split by columns or not split."""
    D, local = args.head_dim, local_args(args, world)
    if name.endswith(("attention.wqkv.weight", "attention.wqkv.bias")):
        q, kv, q_l, kv_l = args.n_heads * D, args.n_kv_heads * D, local.n_heads * D, local.n_kv_heads * D
        return [(rank * q_l, (rank + 1) * q_l), (q + rank * kv_l, q + (rank + 1) * kv_l),
                (q + kv + rank * kv_l, q + kv + (rank + 1) * kv_l)]
    if name.endswith("feed_forward.w13.weight"):
        I, I_l = args.intermediate_size, local.intermediate_size
        parts = 2 if args.mlp == "swiglu" else 1  # gate and up side by side, or up alone
        return [(p * I + rank * I_l, p * I + (rank + 1) * I_l) for p in range(parts)]
    return None


def column_range(name: str, args: ModelArgs, rank: int, world: int) -> tuple[int, int] | None:
    """The columns of tensor `name` that rank holds; None for one not split by columns."""
    local = local_args(args, world)
    if name.endswith("attention.wo.weight"):
        n = local.n_heads * args.head_dim
        return rank * n, (rank + 1) * n
    if name.endswith("feed_forward.w2.weight"):
        n = local.intermediate_size
        return rank * n, (rank + 1) * n
    return None
