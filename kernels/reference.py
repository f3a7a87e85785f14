"""Pure-PyTorch implementations of the cache ops: the CPU path and the kernels' oracle.

Cache buffers of one layer (B slots, H kv heads, L = max_seq_len, D = head_dim; packed
layouts in quantize_kv.py):
    k_ring, v_ring [B, H, R, D]    token p at ring index p % R while unquantized
    k_sink, v_sink [B, H, S, D]    the first S tokens, kept in full precision for good
    k_packed [B, H, L * bits_k / 32, D], k_scale, k_min [B, H, L / G, D]
    v_packed [B, H, L, D * bits_v / 32], v_scale, v_min [B, H, L, D / G]
    lengths, n_quantized [B] int32 tokens in the sequence, of which quantized (n_q % G == 0)
A position p of a slot is read from the sink buffer if p < S, else from the packed store if
p < n_q, else from the ring. The plain fp cache is the case n_q == 0 with R = L.
"""

import torch
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


def flush_reference(
    k_ring: Tensor, v_ring: Tensor,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    lengths: Tensor, bits_k: int, bits_v: int, group_size: int, n_sink: int,
) -> None:
    """Quantize the oldest G ring tokens of every slot whose ring became full with its last
    append (length >= R and (length - R) % G == 0): tokens [length - R, length - R + G).

    Branch-free over slots: every slot's candidate group is quantized, and written back only
    where the predicate holds (elsewhere the stored values are rewritten unchanged).
    """
    B, H, R, D = k_ring.shape
    G = group_size
    lengths = lengths.long()
    start = (lengths - R).clamp(min=0) // G * G  # [B]
    due = (lengths >= R) & ((lengths - R) % G == 0)  # [B]
    ring_idx = ((start[:, None] + torch.arange(G, device=k_ring.device)) % R)[:, None, :, None]  # [B, 1, G, 1]
    k = k_ring.gather(2, ring_idx.expand(B, H, G, D))  # [B, H, G, D]
    v = v_ring.gather(2, ring_idx.expand(B, H, G, D))
    kp, ks, km = quantize_keys(hide_sinks(k, start, n_sink), bits_k, G)  # [B, H, G*bits/32, D], [B, H, 1, D]
    vp, vs, vm = quantize_values(v, bits_v, G)  # [B, H, G, D*bits/32], [B, H, G, D/G]
    rows = G * bits_k // 32
    key_rows = (start // G * rows)[:, None] + torch.arange(rows, device=k.device)  # [B, rows]
    tokens = start[:, None] + torch.arange(G, device=k.device)  # [B, G]
    for buf, new, idx in (
        (k_packed, kp, key_rows), (k_scale, ks, (start // G)[:, None]), (k_min, km, (start // G)[:, None]),
        (v_packed, vp, tokens), (v_scale, vs, tokens), (v_min, vm, tokens),
    ):
        idx = idx[:, None, :, None].expand(B, H, idx.shape[1], buf.shape[3])
        old = buf.gather(2, idx)
        buf.scatter_(2, idx, torch.where(due[:, None, None, None], new, old))


def decode_attention_reference(
    q: Tensor, k_ring: Tensor, v_ring: Tensor, k_sink: Tensor, v_sink: Tensor,
    k_packed: Tensor, k_scale: Tensor, k_min: Tensor, v_packed: Tensor, v_scale: Tensor, v_min: Tensor,
    lengths: Tensor, n_quantized: Tensor, bits_k: int, bits_v: int, group_size: int, sm_scale: float,
) -> Tensor:
    """Attention of one query token per slot, q [B, Hq, D], over positions 0..lengths[b]-1
    of slot b (sinks, dequantized store, ring), chunk by chunk with an online softmax.
    Returns [B, Hq, D] in q's dtype; computed in float32."""
    B, Hq, D = q.shape
    H, R, S = k_ring.shape[1], k_ring.shape[2], k_sink.shape[2]
    G = group_size
    out = torch.empty_like(q)
    for b in range(B):
        length, n_q = int(lengths[b]), int(n_quantized[b])
        qb = q[b].float().view(H, Hq // H, D) * sm_scale
        m = torch.full((H, Hq // H), float("-inf"), device=q.device)
        denom = torch.zeros_like(m)
        acc = torch.zeros(H, Hq // H, D, device=q.device)

        def attend(keys: Tensor, values: Tensor) -> None:  # keys, values [H, T, D]
            nonlocal m, denom, acc
            scores = torch.einsum("hrd,htd->hrt", qb, keys.float())
            m_new = torch.maximum(m, scores.amax(-1))
            p = torch.exp(scores - m_new[..., None])
            alpha = torch.exp(m - m_new)
            denom = denom * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("hrt,htd->hrd", p, values.float())
            m = m_new

        n_sink = min(S, length)
        if n_sink > 0:
            attend(k_sink[b, :, :n_sink], v_sink[b, :, :n_sink])
        for c0 in range(0, n_q, CHUNK_TOKENS // G * G):
            c1 = min(n_q, c0 + CHUNK_TOKENS // G * G)
            keys = dequantize_keys(k_packed[b, :, c0 * bits_k // 32 : c1 * bits_k // 32],
                                   k_scale[b, :, c0 // G : c1 // G], k_min[b, :, c0 // G : c1 // G], bits_k, G)
            values = dequantize_values(v_packed[b, :, c0:c1], v_scale[b, :, c0:c1], v_min[b, :, c0:c1], bits_v, G)
            skip = max(0, n_sink - c0)  # sink positions come from the sink buffer
            if c1 - c0 > skip:
                attend(keys[:, skip:], values[:, skip:])
        first = max(n_q, n_sink)
        for c0 in range(first, length, CHUNK_TOKENS):
            idx = torch.arange(c0, min(length, c0 + CHUNK_TOKENS), device=q.device) % R
            attend(k_ring[b, :, idx], v_ring[b, :, idx])
        out[b] = (acc / denom[..., None]).view(Hq, D).to(q.dtype)
    return out
