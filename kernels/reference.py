"""Pure-PyTorch implementations of the cache ops: the CPU path and the kernels' oracle.

Cache buffers of one layer (B slots, H kv heads, L = max_seq_len, D = head_dim; packed
layouts in quantize_kv.py):
    k_ring, v_ring [B, H, R, D]    token p at ring index p % R while unquantized
    k_sink, v_sink [B, H, S, D]    the first S tokens, kept in full precision for good
    k_packed [B, H, L, D * bits_k / 32], k_scale, k_min [B, H, L / G, D]
    v_packed [B, H, L, D * bits_v / 32] (token pairs), v_scale, v_min [B, H, D / G, L]
    lengths, n_quantized [B] int32 tokens in the sequence, of which quantized (n_q % G == 0)
A position p of a slot is read from the sink buffer if p < S, else from the packed store if
p < n_q, else from the ring. The plain fp cache is the case n_q == 0 with R = L.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from quantize_kv import dequantize_keys, dequantize_values, quantize_keys, quantize_values

CHUNK_TOKENS = 1024  # the reference attends chunk by chunk, never to a full fp copy of the cache


def hide_sinks(k: Tensor, first_pos: Tensor, n_sink: int) -> Tensor:
    """k [n, H, T, D] holding positions first_pos[i] + 0..T-1 of slot i: sink positions
    (< n_sink, all in group 0) are replaced by the first real token so that they stay out
    of their key group's min/max. Their codes are never read: attention takes sinks from
    the sink buffer."""
    if n_sink == 0:
        return k
    pos = first_pos[:, None] + torch.arange(k.shape[2], device=k.device)  # [n, T]
    return torch.where((pos < n_sink)[:, None, :, None], k[:, :, n_sink : n_sink + 1], k)


def append_reference(k_ring: Tensor, v_ring: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> None:
    """Write each slot's new token, k, v [B, H, D], at ring index input_pos % R (a plain cache
    is a ring of R = max_seq_len)."""
    rows = torch.arange(k.shape[0], device=k.device)
    idx = input_pos % k_ring.shape[2]
    k_ring[rows, :, idx] = k
    v_ring[rows, :, idx] = v


def flush_reference(
    k_ring: Tensor, v_ring: Tensor,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    lengths: Tensor, bits_k: int, bits_v: int, group_size: int, n_sink: int,
) -> None:
    """Quantize the oldest G ring tokens of every slot whose ring became full with its last
    append (length >= R and (length - R) % G == 0): tokens [length - R, length - R + G).

    Branch-free over slots: every slot's candidate group is quantized, and written back only
    where the predicate holds (elsewhere the stored values are rewritten unchanged); a step
    where no slot is due returns at once (a host check: on the CPU it costs nothing).
    """
    B, H, R, D = k_ring.shape
    G = group_size
    due = [n >= R and (n - R) % G == 0 for n in lengths.tolist()]  # [B], on the host
    if not any(due):
        return
    due = torch.tensor(due, device=k_ring.device)
    lengths = lengths.long()
    start = (lengths - R).clamp(min=0) // G * G  # [B]
    ring_idx = ((start[:, None] + torch.arange(G, device=k_ring.device)) % R)[:, None, :, None]  # [B, 1, G, 1]
    k = k_ring.gather(2, ring_idx.expand(B, H, G, D))  # [B, H, G, D]
    v = v_ring.gather(2, ring_idx.expand(B, H, G, D))
    kp, ks, km = quantize_keys(hide_sinks(k, start, n_sink), bits_k, G)  # [B, H, G, D*bits/32], [B, H, 1, D]
    vp, vs, vm = quantize_values(v, bits_v, G)  # [B, H, G, D*bits/32], [B, H, D/G, G]
    tokens = start[:, None] + torch.arange(G, device=k.device)  # [B, G]
    for buf, new, idx, dim in (  # idx [B, n]: the rows (dim 2) or columns (dim 3) written
        (k_packed, kp, tokens, 2), (k_scale, ks, (start // G)[:, None], 2), (k_min, km, (start // G)[:, None], 2),
        (v_packed, vp, tokens, 2), (v_scale, vs, tokens, 3), (v_min, vm, tokens, 3),
    ):
        idx = idx[:, None, :, None] if dim == 2 else idx[:, None, None, :]
        idx = idx.expand(new.shape)
        old = buf.gather(dim, idx)
        buf.scatter_(dim, idx, torch.where(due[:, None, None, None], new, old))


def quantize_prompt_reference(
    k: Tensor, v: Tensor, prompts: Tensor, longest: int,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    bits_k: int, bits_v: int, group_size: int, n_sink: int,
) -> None:
    """Quantize the whole groups of n prompts packed along one token axis, k, v [N, H, D]:
    prompts [n, 3] int32 rows (first packed token, slot, count), the count (a multiple of G,
    at most `longest`) of tokens from the first into positions 0 .. count - 1 of the slot's
    store (sinks hidden from group 0's key ranges)."""
    G = group_size
    first_pos = torch.zeros(1, dtype=torch.long, device=k.device)
    for first, slot, count in prompts.tolist():
        if count == 0:
            continue
        kp, ks, km = quantize_keys(hide_sinks(k[first : first + count].transpose(0, 1)[None], first_pos, n_sink),
                                   bits_k, G)  # [1, H, count, ...]
        vp, vs, vm = quantize_values(v[first : first + count].transpose(0, 1)[None], bits_v, G)
        k_packed[slot, :, :count] = kp[0]
        k_scale[slot, :, : count // G] = ks[0]
        k_min[slot, :, : count // G] = km[0]
        v_packed[slot, :, :count] = vp[0]
        v_scale[slot, :, :, :count] = vs[0]
        v_min[slot, :, :, :count] = vm[0]


def decode_attention_reference(
    q: Tensor, k_ring: Tensor, v_ring: Tensor, k_sink: Tensor, v_sink: Tensor,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    lengths: Tensor, n_quantized: Tensor, bits_k: int, bits_v: int, group_size: int, sm_scale: float,
    window: int = 0,
) -> Tensor:
    """Attention of one query token per slot, q [B, Hq, D], over positions 0..lengths[b]-1
    of slot b (sinks, dequantized store, ring), or with window > 0 over the last `window` of
    them, for all slots together: one attention when the longest slot fits in CHUNK_TOKENS,
    else chunk by chunk with an online softmax. Returns [B, Hq, D] in q's dtype; computed in
    float32.

    The lengths are read on the host (this runs on the CPU, or as an eager op): which stores a
    chunk touches, and whether any position is dead at all, are decided there, so that a
    batch of one at batch-1 decode costs little more than one SDPA call."""
    B, Hq, D = q.shape
    H = k_ring.shape[1]
    qf = q.float().view(B, H, Hq // H, D)
    lens, stored = lengths.tolist(), n_quantized.tolist()
    longest, quantized = max(lens), max(stored)
    # dead positions: past a shorter slot's length, or before a slot's window
    masked = min(lens) < longest or 0 < window < longest
    chunk = CHUNK_TOKENS // group_size * group_size
    store = (k_ring, v_ring, k_sink, v_sink, k_packed, k_scale, k_min, v_packed, v_scale, v_min)
    if longest == 0:
        return torch.zeros_like(q)

    def positions(c0: int, c_end: int) -> tuple[Tensor, Tensor, Tensor | None]:
        return _positions(c0, c_end, store, lengths, n_quantized, quantized, masked, bits_k, bits_v, group_size, window)

    if longest <= chunk:  # one chunk: a plain (masked) attention
        if not masked and quantized == min(stored):  # every slot alike (batch 1 above all)
            keys, values, dead = *_uniform_positions(store, quantized, longest, bits_k, bits_v, group_size), None
        else:
            keys, values, dead = positions(0, longest)
        mask = None if dead is None else ~dead.transpose(2, 3)
        out = F.scaled_dot_product_attention(qf, keys, values, attn_mask=mask, scale=sm_scale)
        return out.reshape(B, Hq, D).to(q.dtype)  # SDPA may return it strided
    qf = qf * sm_scale
    m = torch.full((B, H, Hq // H), float("-inf"), device=q.device)
    denom = torch.zeros_like(m)
    acc = torch.zeros(B, H, Hq // H, D, device=q.device)
    for c0 in range(0, longest, chunk):
        keys, values, dead = positions(c0, min(c0 + chunk, longest))
        scores = torch.einsum("bhrd,bhtd->bhrt", qf, keys)
        if dead is not None:
            scores = scores.masked_fill(dead.transpose(2, 3), float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0)  # a slot with nothing live yet
        p = torch.exp(scores - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        denom = denom * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhrt,bhtd->bhrd", p, values)
        m = m_new
    return (acc / denom[..., None]).view(B, Hq, D).to(q.dtype)


def _uniform_positions(store: tuple, n_q: int, length: int, bits_k: int, bits_v: int, G: int) -> tuple[Tensor, Tensor]:
    """Keys and values [B, H, length, D] float32 of positions 0 .. length - 1 when every slot
    holds `length` positions, the first n_q in the store: the sinks, the rest of the
    dequantized store, then positions n_q .. length - 1 at ring index p % R, two runs at most
    (length - n_q <= R), read without a gather. A single run of a float32 ring (the plain
    cache) is returned as a view; otherwise every part is written once into a new tensor."""
    k_ring, v_ring, k_sink, v_sink, k_packed, k_scale, k_min, v_packed, v_scale, v_min = store
    B, H, R, D = k_ring.shape
    start, count = n_q % R, length - n_q
    first = min(count, R - start)
    n_sink = min(k_sink.shape[2], length)
    if n_q == 0 and first == count and n_sink == 0:
        return k_ring[:, :, start : start + count].float(), v_ring[:, :, start : start + count].float()
    keys = torch.empty(B, H, length, D, device=k_ring.device)
    values = torch.empty_like(keys)
    for out, ring in ((keys, k_ring), (values, v_ring)):
        out[:, :, n_q : n_q + first] = ring[:, :, start : start + first]
        if count > first:
            out[:, :, n_q + first :] = ring[:, :, : count - first]
    if n_q > 0:
        # straight into the result where the scales are float32; else rounded to their dtype first
        into = k_scale.dtype == torch.float32
        stored_k = dequantize_keys(k_packed[:, :, :n_q], k_scale[:, :, : n_q // G], k_min[:, :, : n_q // G], bits_k,
                                   G, out=keys[:, :, :n_q] if into else None)
        stored_v = dequantize_values(v_packed[:, :, :n_q], v_scale[..., :n_q], v_min[..., :n_q], bits_v, G,
                                     out=values[:, :, :n_q] if into else None)
        if not into:
            keys[:, :, :n_q], values[:, :, :n_q] = stored_k, stored_v
    if n_sink > 0:  # sink positions come from the sink buffer
        keys[:, :, :n_sink], values[:, :, :n_sink] = k_sink[:, :, :n_sink], v_sink[:, :, :n_sink]
    return keys, values


def _positions(c0: int, c_end: int, store: tuple, lengths: Tensor, n_quantized: Tensor, quantized: int, masked: bool,
               bits_k: int, bits_v: int, G: int, window: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keys and values [B, H, T, D] float32 of positions c0 .. c_end - 1 of every slot, read
    from the sinks, the dequantized store or the ring, and dead [B, 1, T, 1]: positions
    outside each slot (past its length, before its window), their values zeroed; dead is None
    when `masked` says no slot has any. quantized: the most any slot holds in the store."""
    k_ring, v_ring, k_sink, v_sink, k_packed, k_scale, k_min, v_packed, v_scale, v_min = store
    R, S = k_ring.shape[2], k_sink.shape[2]
    c1 = min(c_end, quantized)
    pos = torch.arange(c0, c_end, device=k_ring.device)  # [T]
    if c1 <= c0 and c0 >= S and c_end <= R:  # ring positions only, at ring index p % R = p: a read-only view
        keys, values = k_ring[:, :, c0:c_end].float(), v_ring[:, :, c0:c_end].float()
    else:
        keys, values = k_ring[:, :, pos % R].float(), v_ring[:, :, pos % R].float()  # copies
    if c1 > c0:  # some slot has quantized positions in this chunk
        in_store = (pos[: c1 - c0] < n_quantized[:, None])[:, None, :, None]  # [B, 1, T', 1]
        stored_k = dequantize_keys(k_packed[:, :, c0:c1], k_scale[:, :, c0 // G : c1 // G],
                                   k_min[:, :, c0 // G : c1 // G], bits_k, G)
        stored_v = dequantize_values(v_packed[:, :, c0:c1], v_scale[..., c0:c1], v_min[..., c0:c1], bits_v, G)
        keys[:, :, : c1 - c0] = torch.where(in_store, stored_k.float(), keys[:, :, : c1 - c0])
        values[:, :, : c1 - c0] = torch.where(in_store, stored_v.float(), values[:, :, : c1 - c0])
    if c0 < S:  # sink positions come from the sink buffer
        n = min(S, c_end) - c0
        keys[:, :, :n] = k_sink[:, :, c0 : c0 + n].float()
        values[:, :, :n] = v_sink[:, :, c0 : c0 + n].float()
    if not masked:
        return keys, values, None
    length = lengths[:, None]  # [B, 1]
    dead = (pos >= length) | (pos < length - window if window else False)  # [B, T]
    dead = dead[:, None, :, None]
    return keys, values.masked_fill(dead, 0), dead  # a dead key only meets a masked score
