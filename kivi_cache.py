"""Static, preallocated KV caches: the plain fp cache and the KIVI cache.

Both are nn.Modules whose buffers are allocated once for `max_batch` slots of
`max_seq_len` tokens and only ever written in place, so a decode step that uses them can be
captured in a CUDA graph. Every slot has its own length; the decode step receives the
position of each slot's new token as a device tensor `input_pos` [B] and derives every
other per-slot quantity from it.

KIVI cache, per layer and slot:
  - positions [0, n_q) live in the packed store: keys per-channel (groups of G tokens of
    one channel), values per-token (groups of G channels), at `bits_k` / `bits_v` bits;
  - positions [n_q, length) live in a circular residual ring of R tokens, in the model
    dtype, token p at ring index p % R;
  - optionally the first S "sink" tokens also stay in a small fp buffer for good, and
    attention reads them from there.
A cache built with a sliding window W > 0 attends each slot's last W positions only (the
same buffers: the window is a range the kernels read, not a smaller store).
Flush rule: when an append fills the ring (length - n_q == R), the oldest G ring tokens
are quantized, so n_q advances by G and the ring keeps the newest R - G .. R - 1 tokens.
n_q is therefore a function of the length alone:
    n_q(length) = 0 if length < R else G * ((length - R) // G + 1)
and prefill of a T-token prompt leaves exactly the state T decode appends would: its first
n_q(T) tokens are quantized straight into the packed store, the rest go to the ring.
"""

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import kernels  # registers torch.ops.kivi; kernels.call calls them
from quantize_kv import check_bits


def n_quantized(lengths: Tensor | int, residual_len: int, group_size: int) -> Tensor | int:
    """Tokens held in the packed store, for slot lengths [B] (int32) or one length (see the top)."""
    full = (lengths + (group_size - residual_len)) // group_size  # groups flushed; floor division: <= 0 below R
    if isinstance(full, int):
        return group_size * max(full, 0)
    return full.clamp(min=0) * group_size  # int32, as lengths


def parse_kv_mode(mode: str) -> tuple[int, int] | None:
    """'fp16' -> None; 'kivi2' -> (2, 2); 'kivi4' -> (4, 4); 'k4v2' -> (4, 2)."""
    key = mode.lower()
    if key in ("fp16", "fp", "bf16"):
        return None
    if key in ("kivi2", "kivi4"):
        return int(key[-1]), int(key[-1])
    if len(key) == 4 and key[0] == "k" and key[2] == "v" and key[1] in "24" and key[3] in "24":
        return int(key[1]), int(key[3])
    raise ValueError(f"unknown --kv mode {mode!r}: use fp16, kivi2, kivi4 or k{{2,4}}v{{2,4}} (e.g. k4v2)")


@dataclass(frozen=True)
class CacheConfig:
    """A --kv mode and the KIVI settings that go with it."""

    kv: str = "fp16"
    group_size: int = 32
    residual_len: int = 128
    n_sink: int = 0

    def check(self, head_dim: int) -> None:
        bits = parse_kv_mode(self.kv)
        if bits is not None:
            check_kivi_config(head_dim, *bits, self.group_size, self.residual_len, self.n_sink)

    def make(self, max_batch: int, n_kv_heads: int, head_dim: int, max_seq_len: int, dtype: torch.dtype,
             device: torch.device | str, window: int = 0) -> nn.Module:
        """The cache of one layer; window: the model's sliding window (0: none)."""
        bits = parse_kv_mode(self.kv)
        if bits is None:
            return StaticCache(max_batch, n_kv_heads, head_dim, max_seq_len, dtype, device, window)
        return KiviCache(max_batch, n_kv_heads, head_dim, max_seq_len, *bits, self.group_size, self.residual_len,
                         self.n_sink, dtype, device, window)


class PackedPrompts:
    """n prompts packed along one token axis for a prefill forward: prompt i is packed tokens
    first[i] .. first[i] + seq_lens[i] - 1 and fills positions 0 .. seq_lens[i] - 1 of cache
    slot slots[i]. Made once a forward and handed to every layer's cache; the index tensors a
    cache scatters with are made on the device at the first layer's call and reused by the
    others (a host-to-device copy waits for the GPU: one a forward, not one a layer)."""

    def __init__(self, slots: list[int], seq_lens: list[int], device: torch.device | str):
        if len(slots) != len(seq_lens) or not seq_lens or min(seq_lens) < 1:
            raise ValueError(f"prefill takes one slot per non-empty prompt: slots {slots}, lengths {seq_lens}")
        self.slots, self.seq_lens, self.device = list(slots), list(seq_lens), torch.device(device)
        self.first = list(itertools.accumulate(seq_lens, initial=0))[:-1]
        self._made: dict = {}

    def on_device(self, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        """make() (a CPU tensor) on the device, made once per key."""
        if key not in self._made:
            self._made[key] = make().to(self.device)
        return self._made[key]

    def cu_lens(self) -> Tensor:
        """[n + 1] int32: prompt i is packed tokens cu_lens[i] .. cu_lens[i + 1] - 1."""
        return self.on_device(("cu_lens",), lambda: torch.tensor([*self.first, sum(self.seq_lens)], dtype=torch.int32))

    def part(self, start: list[int], end: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Positions start[i] .. end[i] - 1 of every prompt i: their packed token, slot and
        position, each [M] int64 on the device."""
        def make() -> Tensor:
            counts = torch.tensor(end) - torch.tensor(start)
            prompt = torch.repeat_interleave(torch.arange(len(counts)), counts)  # [M]
            offset = torch.arange(len(prompt)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
            pos = torch.tensor(start)[prompt] + offset
            return torch.stack([torch.tensor(self.first)[prompt] + pos, torch.tensor(self.slots)[prompt], pos])

        return tuple(self.on_device(("part", *start, *end), make))


class StaticCache(nn.Module):
    """Plain cache: k_cache, v_cache [max_batch, kv_heads, max_seq_len, head_dim]."""

    def __init__(self, max_batch: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device | str | None = None, window: int = 0):
        super().__init__()
        self.window = window
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device))
        # The attention op reads a plain cache as a ring of R = max_seq_len with nothing quantized.
        self.register_buffer("empty", torch.zeros(max_batch, n_kv_heads, 0, head_dim, dtype=dtype, device=device))
        self.register_buffer("empty_codes", torch.zeros(max_batch, n_kv_heads, 0, head_dim, dtype=torch.int32, device=device))

    def prefill(self, prompts: "PackedPrompts", k: Tensor, v: Tensor) -> None:
        """k, v [N, H, D]: the packed prompts' tokens, in order."""
        _, slot, pos = prompts.part([0] * len(prompts.seq_lens), prompts.seq_lens)
        self.k_cache[slot, :, pos] = k
        self.v_cache[slot, :, pos] = v

    def decode(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        kernels.call("append", self.k_cache, self.v_cache, k, v, input_pos)
        lengths = (input_pos + 1).to(torch.int32)
        e, c = self.empty, self.empty_codes
        return kernels.call("decode_attention",
            q, self.k_cache, self.v_cache, e, e, c, e, e, c, e, e,
            lengths, torch.zeros_like(lengths), 2, 2, 32, q.shape[-1] ** -0.5, self.window,
        )


class KiviCache(nn.Module):
    def __init__(self, max_batch: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
                 bits_k: int, bits_v: int, group_size: int = 32, residual_len: int = 128, n_sink: int = 0,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None, window: int = 0):
        super().__init__()
        check_kivi_config(head_dim, bits_k, bits_v, group_size, residual_len, n_sink)
        self.bits_k, self.bits_v, self.group_size = bits_k, bits_v, group_size
        self.residual_len, self.n_sink, self.window = residual_len, n_sink, window
        G, R, B, H, D = group_size, residual_len, max_batch, n_kv_heads, head_dim
        L = -(-max_seq_len // G) * G  # whole groups

        def buf(name: str, *shape: int, dtype: torch.dtype = dtype) -> None:
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))

        buf("k_packed", B, H, L, D * bits_k // 32, dtype=torch.int32)
        buf("k_scale", B, H, L // G, D)
        buf("k_min", B, H, L // G, D)
        buf("v_packed", B, H, L, D * bits_v // 32, dtype=torch.int32)
        buf("v_scale", B, H, D // G, L)
        buf("v_min", B, H, D // G, L)
        buf("k_ring", B, H, R, D)
        buf("v_ring", B, H, R, D)
        buf("k_sink", B, H, n_sink, D)
        buf("v_sink", B, H, n_sink, D)

    def prefill(self, prompts: "PackedPrompts", k: Tensor, v: Tensor) -> None:
        """k, v [N, H, D]: the packed prompts' tokens (see the flush rule at the top)."""
        G, R, S = self.group_size, self.residual_len, self.n_sink
        lengths = prompts.seq_lens
        n_q = [n_quantized(T, R, G) for T in lengths]
        if S > 0:
            token, slot, pos = prompts.part([0] * len(lengths), [min(S, T) for T in lengths])
            self.k_sink[slot, :, pos] = k[token]
            self.v_sink[slot, :, pos] = v[token]
        if max(n_q) > 0:
            table = prompts.on_device(("quantize", *n_q), lambda: torch.tensor(
                [[first, slot, count] for first, slot, count in zip(prompts.first, prompts.slots, n_q)],
                dtype=torch.int32))
            torch.ops.kivi.quantize_prompt(k, v, table, max(n_q), self.k_packed, self.k_scale, self.k_min,
                                           self.v_packed, self.v_scale, self.v_min, self.bits_k, self.bits_v, G, S)
        token, slot, pos = prompts.part(n_q, lengths)  # positions n_q .. T - 1 (at most R) at ring index p % R
        self.k_ring[slot, :, pos % R] = k[token]
        self.v_ring[slot, :, pos % R] = v[token]

    def decode(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        """Append k, v [B, H, D] at input_pos [B], flush full rings, attend q [B, Hq, D]."""
        kernels.call("append", self.k_ring, self.v_ring, k, v, input_pos)
        if self.n_sink > 0:  # branch-free: slots past their sinks rewrite a sink unchanged
            rows = torch.arange(q.shape[0], device=q.device)
            sink_idx = input_pos.clamp(max=self.n_sink - 1)
            is_sink = (input_pos < self.n_sink)[:, None, None]
            self.k_sink[rows, :, sink_idx] = torch.where(is_sink, k, self.k_sink[rows, :, sink_idx])
            self.v_sink[rows, :, sink_idx] = torch.where(is_sink, v, self.v_sink[rows, :, sink_idx])
        lengths = (input_pos + 1).to(torch.int32)
        kernels.call("flush",
            self.k_ring, self.v_ring, self.k_packed, self.k_scale, self.k_min, self.v_packed, self.v_scale,
            self.v_min, lengths, self.bits_k, self.bits_v, self.group_size, self.n_sink,
        )
        return kernels.call("decode_attention",
            q, self.k_ring, self.v_ring, self.k_sink, self.v_sink, self.k_packed, self.k_scale, self.k_min,
            self.v_packed, self.v_scale, self.v_min, lengths, n_quantized(lengths, self.residual_len, self.group_size),
            self.bits_k, self.bits_v, self.group_size, q.shape[-1] ** -0.5, self.window,
        )


def check_kivi_config(head_dim: int, bits_k: int, bits_v: int, group_size: int, residual_len: int, n_sink: int) -> None:
    """One clear error for each configuration the KIVI cache cannot hold."""
    check_bits(bits_k)
    check_bits(bits_v)
    if group_size <= 0 or residual_len <= 0:
        raise ValueError(f"group size {group_size} and residual length {residual_len} must be positive")
    if residual_len % group_size != 0:
        raise ValueError(f"residual length {residual_len} is not a multiple of the group size {group_size}")
    if head_dim % group_size != 0:
        raise ValueError(f"head_dim {head_dim} is not a multiple of the group size {group_size}")
    for bits in (bits_k, bits_v):
        if head_dim % (32 // bits) != 0:
            raise ValueError(f"head_dim {head_dim} must be a multiple of {32 // bits} (codes per int32 word at {bits} bits)")
    if head_dim % 8 != 0:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 8 (values are packed by 8 channel classes)")
    if group_size % 2 != 0:
        raise ValueError(f"group size {group_size} must be even (values are packed in token pairs)")
    if not 0 <= n_sink < group_size:
        raise ValueError(f"sink tokens {n_sink} must be in [0, group size {group_size})")


def cache_bytes(kv_mode: str, n_kv_heads: int, head_dim: int, max_seq_len: int, dtype: torch.dtype,
                group_size: int = 32, residual_len: int = 128, n_sink: int = 0) -> int:
    """Bytes one slot of one layer's cache allocates (exactly what the buffers above hold)."""
    el = torch.empty(0, dtype=dtype).element_size()
    H, D = n_kv_heads, head_dim
    bits = parse_kv_mode(kv_mode)
    if bits is None:
        return 2 * H * max_seq_len * D * el
    bits_k, bits_v = bits
    G = group_size
    L = -(-max_seq_len // G) * G
    codes = H * L * D * (bits_k + bits_v) // 32 * 4
    stats = 2 * H * L // G * D * el + 2 * H * L * D // G * el
    return codes + stats + 2 * H * (residual_len + n_sink) * D * el
