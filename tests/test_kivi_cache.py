"""The KIVI cache (kivi_cache.py, kernels/reference.py) against its documented semantics.

A plain-Python simulation of the flush rule is the oracle for the cache's contents; a dense
float64 dequantize-then-attend is the oracle for attention; each §2 invariant has its own
test; configuration errors and the byte accounting are pinned too.
"""

import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import kernels.reference as reference
from engine import LLM, sample
from kernels.reference import CHUNK_TOKENS
from kivi_cache import (
    CacheConfig,
    KiviCache,
    PackedPrompts,
    StaticCache,
    cache_bytes,
    check_kivi_config,
    n_quantized,
    parse_kv_mode,
)
from model import ModelArgs, build_model
from quantize_kv import dequantize_keys, dequantize_values, quantize_keys, quantize_values

def make_cache(mode, max_batch, n_kv_heads, head_dim, max_seq_len, dtype, device, group_size=32, residual_len=128,
               n_sink=0):
    """The cache of one layer for a --kv mode, as generate builds it."""
    return CacheConfig(mode, group_size, residual_len, n_sink).make(max_batch, n_kv_heads, head_dim, max_seq_len,
                                                                     dtype, device)


STORE = ("k_packed", "k_scale", "k_min", "v_packed", "v_scale", "v_min")


def prefill(cache, slots: list[int], k, v) -> None:
    """Prefill prompts of one length, k, v [n, H, T, D], into slots, packed as the model packs them."""
    n, H, T, D = k.shape
    cache.prefill(PackedPrompts(slots, [T] * n, k.device), *(x.transpose(1, 2).reshape(n * T, H, D) for x in (k, v)))


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def n_q_of(length: int, R: int, G: int) -> int:
    """kivi_cache docstring: n_q(length)."""
    return 0 if length < R else G * ((length - R) // G + 1)


def kv_tokens(gen, shape, dtype=torch.float32, offset=0.0):
    """Random keys/values with per-channel outliers (key outliers live in fixed channels)."""
    chan = 0.5 + 4.5 * torch.rand(shape[-1], generator=gen)
    x = torch.randn(shape, generator=gen) * chan + offset + 0.25
    assert x.abs().max() > 0
    return x.to(dtype)


def dense_attention(q, K, V):
    """q [Hq, D], K, V [H, T, D] -> [Hq, D] float64; query head h reads kv head h // (Hq / H)."""
    Hq, H, D = q.shape[0], K.shape[0], q.shape[-1]
    K = K.double().repeat_interleave(Hq // H, 0)
    V = V.double().repeat_interleave(Hq // H, 0)
    p = torch.softmax(torch.einsum("hd,htd->ht", q.double(), K) / math.sqrt(D), -1)
    return torch.einsum("ht,htd->hd", p, V)


def attention_tol(q, K, V, out_dtype=torch.float32):
    """float32 rounding of attention: a score's error is a few ulps of
    max_t sum_d |q_d K_td| / sqrt(D), and moves the output by about that times max|V|;
    plus the rounding of the output to its dtype."""
    Hq, H, D = q.shape[0], K.shape[0], q.shape[-1]
    mag = torch.einsum("hd,htd->ht", q.double().abs(), K.double().abs().repeat_interleave(Hq // H, 0)).max()
    u = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[out_dtype]
    return 4 * 2.0**-24 * (1 + mag / math.sqrt(D)) * V.double().abs().max() + 2 * u * V.double().abs().max()


def cache_view(cache: KiviCache, b: int, length: int):
    """What a slot holds for positions 0..length-1, read from the buffers with quantize_kv:
    sinks from the sink buffer, [S, n_q) dequantized from the store, the rest from the ring."""
    G, R, S, bk, bv = cache.group_size, cache.residual_len, cache.n_sink, cache.bits_k, cache.bits_v
    nq = n_q_of(length, R, G)
    H, D = cache.k_ring.shape[1], cache.k_ring.shape[3]
    K = torch.empty(H, length, D, dtype=torch.float64)
    V = torch.empty_like(K)
    if nq:
        K[:, :nq] = dequantize_keys(cache.k_packed[b, :, :nq], cache.k_scale[b, :, : nq // G],
                                    cache.k_min[b, :, : nq // G], bk, G).double()
        V[:, :nq] = dequantize_values(cache.v_packed[b, :, :nq], cache.v_scale[b, ..., :nq],
                                      cache.v_min[b, ..., :nq], bv, G).double()
    idx = torch.arange(nq, length) % R
    K[:, nq:] = cache.k_ring[b][:, idx].double()
    V[:, nq:] = cache.v_ring[b][:, idx].double()
    s = min(S, length)
    K[:, :s] = cache.k_sink[b, :, :s].double()
    V[:, :s] = cache.v_sink[b, :, :s].double()
    return K, V


class SlotSim:
    """One sequence under the flush rule, written the obvious way: after each append, if the
    unquantized tail holds R tokens, its oldest G tokens become one quantized group."""

    def __init__(self, G, R, S, bits_k, bits_v):
        self.G, self.R, self.S, self.bits_k, self.bits_v = G, R, S, bits_k, bits_v
        self.reset()

    def reset(self):
        self.k, self.v, self.kq, self.vq, self.n_q = [], [], [], [], 0

    def append(self, k, v):  # k, v [H, D]
        self.k.append(k)
        self.v.append(v)
        if len(self.k) - self.n_q == self.R:
            G, lo = self.G, self.n_q
            kg = torch.stack(self.k[lo : lo + G], 1)  # [H, G, D]: exactly the group's tokens
            vg = torch.stack(self.v[lo : lo + G], 1)
            if lo == 0 and self.S > 0:  # sinks stay out of their key group's min/max
                kg = kg.clone()
                kg[:, : self.S] = kg[:, self.S : self.S + 1]
            self.kq.append(dequantize_keys(*quantize_keys(kg, self.bits_k, G), self.bits_k, G))
            self.vq.append(dequantize_values(*quantize_values(vg, self.bits_v, G), self.bits_v, G))
            self.n_q += G

    def view(self):
        K, V = torch.stack(self.k, 1).clone(), torch.stack(self.v, 1).clone()
        if self.n_q:
            K[:, self.S : self.n_q] = torch.cat(self.kq, 1)[:, self.S :]
            V[:, self.S : self.n_q] = torch.cat(self.vq, 1)[:, self.S :]
        return K, V


def check_slot_matches_sim(cache: KiviCache, b: int, sim: SlotSim):
    L, nq, R, G, S = len(sim.k), sim.n_q, sim.R, sim.G, sim.S
    assert int(n_quantized(torch.tensor([L], dtype=torch.int32), R, G)[0]) == nq
    if L > nq:  # unquantized positions p at ring index p % R
        idx = torch.arange(nq, L) % R
        assert torch.equal(cache.k_ring[b][:, idx], torch.stack(sim.k[nq:], 1)), f"slot {b}: key ring"
        assert torch.equal(cache.v_ring[b][:, idx], torch.stack(sim.v[nq:], 1)), f"slot {b}: value ring"
    if nq:  # quantized positions: the dequantized store (sink positions are read from the sinks)
        k_hat = dequantize_keys(cache.k_packed[b, :, :nq], cache.k_scale[b, :, : nq // G],
                                cache.k_min[b, :, : nq // G], sim.bits_k, G)
        v_hat = dequantize_values(cache.v_packed[b, :, :nq], cache.v_scale[b, ..., :nq], cache.v_min[b, ..., :nq],
                                  sim.bits_v, G)
        assert torch.equal(k_hat[:, S:], torch.cat(sim.kq, 1)[:, S:]), f"slot {b}: key store"
        assert torch.equal(v_hat[:, S:], torch.cat(sim.vq, 1)[:, S:]), f"slot {b}: value store"
    s = min(S, L)
    if s:
        assert torch.equal(cache.k_sink[b, :, :s], torch.stack(sim.k[:s], 1)), f"slot {b}: key sinks"
        assert torch.equal(cache.v_sink[b, :, :s], torch.stack(sim.v[:s], 1)), f"slot {b}: value sinks"


SIM_CONFIGS = [  # G, R, bits_k, bits_v, n_sink, head_dim, dtype
    pytest.param(16, 16, 2, 2, 0, 32, torch.float32, id="kivi2-R=G"),
    pytest.param(16, 64, 2, 2, 3, 32, torch.float32, id="kivi2-R=4G-sinks3"),
    pytest.param(16, 32, 4, 2, 3, 16, torch.float32, id="k4v2-R=2G-sinks3"),
    pytest.param(8, 8, 4, 4, 3, 16, torch.float16, id="kivi4-R=G-sinks3-fp16"),
    pytest.param(4, 16, 8, 8, 0, 8, torch.bfloat16, id="k8v8-R=4G-bf16"),
    pytest.param(32, 32, 2, 4, 0, 32, torch.float32, id="k2v4-R=G"),
]


@pytest.mark.parametrize("G,R,bits_k,bits_v,S,D,dtype", SIM_CONFIGS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_cache_contents_and_attention_match_flush_rule_simulation(G, R, bits_k, bits_v, S, D, dtype, data):
    B, H, Hq = 3, 2, 4
    max_len = R + 3 * G + 3  # not a multiple of G
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    cache = KiviCache(B, H, D, max_len, bits_k, bits_v, G, R, S, dtype)
    sims = [SlotSim(G, R, S, bits_k, bits_v) for _ in range(B)]

    def prefill_slots(slots, T):
        k, v = kv_tokens(gen, (len(slots), H, T, D), dtype), kv_tokens(gen, (len(slots), H, T, D), dtype)
        prefill(cache, slots, k, v)
        for i, b in enumerate(slots):  # a reset: the slot now holds this prompt only
            sims[b].reset()
            for t in range(T):
                sims[b].append(k[i, :, t], v[i, :, t])
        for b in range(B):
            check_slot_matches_sim(cache, b, sims[b])

    def decode_step():
        k, v, q = kv_tokens(gen, (B, H, D), dtype), kv_tokens(gen, (B, H, D), dtype), kv_tokens(gen, (B, Hq, D), dtype)
        input_pos = torch.tensor([len(s.k) for s in sims])  # each slot at its own position
        out = cache.decode(q, k, v, input_pos)
        for b in range(B):
            sims[b].append(k[b], v[b])
            check_slot_matches_sim(cache, b, sims[b])
            K, V = sims[b].view()
            err = (out[b].double() - dense_attention(q[b], K, V)).abs().max()
            assert err <= attention_tol(q[b], K, V, dtype), f"slot {b}: attention"

    for b, T in enumerate(data.draw(st.lists(st.integers(1, max_len - 1), min_size=B, max_size=B), label="prompts")):
        prefill_slots([b], T)
    ops = data.draw(st.lists(st.one_of(
        st.tuples(st.just("prefill"), st.lists(st.integers(0, B - 1), min_size=1, max_size=B, unique=True),
                  st.integers(1, max_len - 1)),
        st.tuples(st.just("decode"), st.integers(1, R + 2 * G)),
    ), min_size=1, max_size=5), label="ops")
    for op in ops:
        if op[0] == "prefill":
            prefill_slots(op[1], op[2])
        else:
            for _ in range(min(op[1], max_len - max(len(s.k) for s in sims))):
                decode_step()
    event(f"groups quantized in the fullest slot: {min(3, max(s.n_q for s in sims) // G)}")
    event(f"re-prefills: {min(2, sum(op[0] == 'prefill' for op in ops))}")


@pytest.mark.parametrize("G,R", [(16, 16), (16, 64), (32, 128), (8, 24)])
def test_n_quantized_follows_the_flush_rule_in_whole_groups(G, R):
    lengths = torch.arange(0, R + 6 * G, dtype=torch.int32)
    nq = n_quantized(lengths, R, G).tolist()
    expected, quantized = [], 0
    for length in range(len(lengths)):  # one append at a time
        if length - quantized == R:
            quantized += G
        expected.append(quantized)
    assert nq == expected
    assert [n_quantized(length, R, G) for length in range(len(lengths))] == expected  # the int form prefill uses
    for length, q in enumerate(nq):
        assert q % G == 0 and q <= length  # whole groups of real tokens only
        if length >= R:
            assert R - G <= length - q <= R - 1  # the ring keeps at least R - G newest tokens
        else:
            assert q == 0


@pytest.mark.parametrize("T_offset", [-1, 0, 1, 15, 16, 17, 40])
def test_prefill_leaves_the_state_of_T_decode_appends(T_offset):
    G, R, S, H, D = 16, 32, 3, 2, 32
    T = R + T_offset
    gen = torch.Generator().manual_seed(100 + T_offset)
    k, v = kv_tokens(gen, (1, H, T, D)), kv_tokens(gen, (1, H, T, D))
    a = KiviCache(1, H, D, T + 1, 2, 2, G, R, S, torch.float32)
    b = KiviCache(1, H, D, T + 1, 2, 2, G, R, S, torch.float32)
    prefill(a, [0], k, v)
    q = kv_tokens(gen, (1, 2 * H, D))
    for t in range(T):
        b.decode(q, k[:, :, t], v[:, :, t], torch.tensor([t]))
    nq = n_q_of(T, R, G)
    for name in STORE:  # stored groups identical; nothing else written
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for x, y in zip(cache_view(a, 0, T), cache_view(b, 0, T)):
        assert torch.equal(x, y)
    assert nq == int(n_quantized(torch.tensor([T]), R, G)[0])


# ---------------------------------------------------------------- cache invariants, one test each


def fill_kivi(cache, data_for_slot, prompt_lens, steps, gen, Hq):
    """Prefill each slot separately, then `steps` decode appends of all slots. Returns the outputs."""
    H, D = cache.k_ring.shape[1], cache.k_ring.shape[3]
    for b, T in enumerate(prompt_lens):
        prefill(cache, [b], data_for_slot(b, (1, H, T, D)), data_for_slot(b, (1, H, T, D)))
    pos = torch.tensor(prompt_lens)
    outs = []
    for _ in range(steps):
        B = len(prompt_lens)
        k = torch.cat([data_for_slot(b, (1, H, D)) for b in range(B)])
        v = torch.cat([data_for_slot(b, (1, H, D)) for b in range(B)])
        q = kv_tokens(gen, (B, Hq, D))
        outs.append(cache.decode(q, k, v, pos))
        pos = pos + 1
    return outs


@pytest.mark.parametrize("together", [False, True])
def test_huge_values_in_one_slot_do_not_change_another_slots_state(together):
    """A group never mixes two sequences: slot 1's codes, scales, mins, ring and outputs are
    bitwise the same whether slot 0 holds values near 1e4 or ordinary ones."""
    G, R, H, D, Hq = 16, 16, 2, 32, 4
    results = []
    for slot0_scale in (1.0, 1e4):
        gen = torch.Generator().manual_seed(5)
        gens = [torch.Generator().manual_seed(6), torch.Generator().manual_seed(7)]

        def data(b, shape):
            x = kv_tokens(gens[b], shape)
            return x * slot0_scale if b == 0 else x

        cache = KiviCache(2, H, D, 120, 2, 2, G, R, 0, torch.float32)
        if together:  # both prompts in one prefill call (one batched quantize)
            k = torch.cat([data(0, (1, H, 40, D)), data(1, (1, H, 40, D))])
            v = torch.cat([data(0, (1, H, 40, D)), data(1, (1, H, 40, D))])
            prefill(cache, [0, 1], k, v)
            outs, pos = [], torch.tensor([40, 40])
            for _ in range(30):
                q = kv_tokens(gen, (2, Hq, D))
                outs.append(cache.decode(q, torch.cat([data(0, (1, H, D)), data(1, (1, H, D))]),
                                         torch.cat([data(0, (1, H, D)), data(1, (1, H, D))]), pos))
                pos = pos + 1
        else:
            outs = fill_kivi(cache, data, [40, 21], 30, gen, Hq)
        results.append((cache, outs))
    (c1, o1), (c2, o2) = results
    assert not torch.equal(c1.k_scale[0], c2.k_scale[0])  # slot 0 really differs
    for name in STORE + ("k_ring", "v_ring"):
        assert torch.equal(getattr(c1, name)[1], getattr(c2, name)[1]), name
    for a, b in zip(o1, o2):
        assert torch.equal(a[1], b[1])


def test_each_stored_group_holds_exactly_its_own_sequences_G_real_tokens():
    """No group mixes sequences or padding: every stored key group's min is the min of that
    slot's G tokens of the group, every value group's min that of its token's G channels.
    Slot 0's data lies in [8, 13], slot 1's in [-8, -3], so zeros (padding) or the other
    slot's tokens in a group would move a min or a scale; prompt lengths are not multiples of G."""
    G, R, H, D = 16, 32, 2, 32
    offsets = (8.0, -8.0)
    gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    seq = [[], []]  # the real tokens of each slot, in order: (k [H, D], v [H, D])

    def data(b, shape):
        return torch.rand(shape, generator=gens[b]) * 5 + offsets[b]

    cache = KiviCache(2, H, D, 140, 2, 2, G, R, 0, torch.float32)
    lens = [53, 7]
    for b, T in enumerate(lens):
        k, v = data(b, (1, H, T, D)), data(b, (1, H, T, D))
        prefill(cache, [b], k, v)
        seq[b] = [(k[0, :, t], v[0, :, t]) for t in range(T)]
    pos = torch.tensor(lens)
    gen = torch.Generator().manual_seed(13)
    for _ in range(70):
        k = torch.cat([data(0, (1, H, D)), data(1, (1, H, D))])
        v = torch.cat([data(0, (1, H, D)), data(1, (1, H, D))])
        cache.decode(kv_tokens(gen, (2, 2 * H, D)), k, v, pos)
        for b in range(2):
            seq[b].append((k[b], v[b]))
        pos = pos + 1
    for b in range(2):
        length = len(seq[b])
        nq = n_q_of(length, R, G)
        assert nq >= 2 * G
        K = torch.stack([t[0] for t in seq[b][:nq]], 1)  # [H, nq, D]
        V = torch.stack([t[1] for t in seq[b][:nq]], 1)
        Kg = K.unflatten(1, (nq // G, G))
        assert torch.equal(cache.k_min[b, :, : nq // G], Kg.amin(2))
        assert torch.allclose(cache.k_scale[b, :, : nq // G], (Kg.amax(2) - Kg.amin(2)) / 3, rtol=1e-6)
        Vg = V.unflatten(2, (D // G, G))
        assert torch.equal(cache.v_min[b, ..., :nq], Vg.amin(3).mT)
        assert torch.allclose(cache.v_scale[b, ..., :nq], (Vg.amax(3) - Vg.amin(3)).mT / 3, rtol=1e-6)


SENTINELS = {torch.int32: 0x5A5A5A5A, torch.float32: 777.0}


@pytest.mark.parametrize("S", [0, 3])
def test_no_group_is_quantized_before_it_holds_G_real_tokens(S):
    """The store past n_q(length) is never written (sentinels survive every prefill and
    decode step), and everything before it has been."""
    G, R, H, D = 16, 32, 2, 32
    cache = KiviCache(2, H, D, 130, 2, 2, G, R, S, torch.float32)
    for name in STORE:
        getattr(cache, name).fill_(SENTINELS[getattr(cache, name).dtype])
    gen = torch.Generator().manual_seed(21)

    def check(lengths):
        for b, length in enumerate(lengths):
            nq = n_q_of(length, R, G)
            rows = {"k_packed": nq, "k_scale": nq // G, "k_min": nq // G,
                    "v_packed": nq, "v_scale": nq, "v_min": nq}
            for name, r in rows.items():
                buf = getattr(cache, name)[b]
                buf = buf.mT if name in ("v_scale", "v_min") else buf  # [H, D / G, L]: tokens first
                sentinel = SENTINELS[buf.dtype]
                assert torch.all(buf[:, r:] == sentinel), f"{name} of slot {b} written past n_q={nq} at length {length}"
                assert not torch.any(buf[:, :r] == sentinel), f"{name} of slot {b} not written below n_q={nq}"

    lens = [R + G + 5, 7]  # 53: one whole group past the ring, 5 tokens of a partial one
    for b, T in enumerate(lens):
        prefill(cache, [b], kv_tokens(gen, (1, H, T, D)), kv_tokens(gen, (1, H, T, D)))
    check(lens)
    pos = torch.tensor(lens)
    for _ in range(60):
        cache.decode(kv_tokens(gen, (2, 2 * H, D)), kv_tokens(gen, (2, H, D)), kv_tokens(gen, (2, H, D)), pos)
        pos = pos + 1
        check(pos.tolist())


@pytest.mark.parametrize("bits_k,bits_v", [(2, 2), (4, 4), (4, 2)])
def test_constant_groups_in_the_cache_dequantize_to_their_value(bits_k, bits_v):
    """A key channel constant over a group and a token whose values are one constant:
    the store dequantizes to exactly those values, never NaN; attention over a cache of
    all-equal keys and values returns that value."""
    G, R, H, D = 16, 16, 2, 32
    gen = torch.Generator().manual_seed(31)
    T = 3 * G
    k, v = kv_tokens(gen, (2, H, T, D)), kv_tokens(gen, (2, H, T, D))
    k[0, :, :G, 5] = -3.25  # constant key group (channel 5, tokens 0..G-1)
    v[0, :, 7, :] = -1.5  # every value group of token 7 constant
    k[1], v[1] = -0.625, -0.375  # slot 1: everything one value
    cache = KiviCache(2, H, D, T + 2 * G, bits_k, bits_v, G, R, 0, torch.float32)
    prefill(cache, [0, 1], k, v)
    pos = torch.tensor([T, T])
    for _ in range(G):  # more flushes, slot 1 still constant
        q = kv_tokens(gen, (2, 2 * H, D))
        kn, vn = kv_tokens(gen, (2, H, D)), kv_tokens(gen, (2, H, D))
        kn[1], vn[1] = -0.625, -0.375
        out = cache.decode(q, kn, vn, pos)
        pos = pos + 1
        assert not torch.isnan(out).any()
        assert torch.allclose(out[1], torch.full_like(out[1], -0.375), rtol=0, atol=1e-6)
    K0, V0 = cache_view(cache, 0, int(pos[0]))
    assert torch.all(K0[:, :G, 5] == -3.25)
    assert torch.all(V0[:, 7, :] == -1.5)
    K1, V1 = cache_view(cache, 1, int(pos[1]))
    assert n_q_of(int(pos[1]), R, G) > 0
    assert torch.all(K1 == -0.625) and torch.all(V1 == -0.375)


@pytest.mark.parametrize("bits", [2, 4])
def test_cache_store_holds_max_codes_beside_zero_codes_without_spill(bits):
    """Two-level groups quantize exactly (codes 0 and 2^bits - 1 only); alternating them along
    the packed axis, any code spilling into a neighbour's bits would corrupt the read-back."""
    G, R, H, D = 16, 16, 1, 32
    M = 2**bits - 1
    lo, step = -1.5, 0.5
    hi = lo + M * step  # scale = step exactly
    t = torch.arange(2 * G)
    k = torch.where((t[:, None] + torch.arange(D)) % 2 == 0, hi, lo).float()  # alternate tokens and channels
    k = k.expand(1, H, 2 * G, D).contiguous()
    v = k.flip(-1).contiguous()
    cache = KiviCache(1, H, D, 3 * G, bits, bits, G, R, 0, torch.float32)
    prefill(cache, [0], k, v)
    nq = n_q_of(2 * G, R, G)
    assert nq == 2 * G
    K, V = cache_view(cache, 0, 2 * G)
    assert torch.equal(K.float(), k[0]) and torch.equal(V.float(), v[0])


@pytest.mark.parametrize("kv,n_sink", [("kivi2", 0), ("k4v2", 3)])
def test_sequence_logits_do_not_depend_on_the_rest_of_the_batch(kv, n_sink):
    """Greedy decode of each prompt alone equals its decode in a batch with prompts of other
    lengths (one prefill per length, no padding), through flushes (R = 32 < lengths)."""
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=256, vocab_size=512,
                     head_dim=32, max_seq_len=256)
    model = build_model(args, None, torch.device("cpu"), torch.float32)
    cfg = CacheConfig(kv, group_size=16, residual_len=32, n_sink=n_sink)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 37, 50)]
    new = 40

    def run(batch):
        logits = []

        def step(m, tokens, input_pos, temperature, top_k, top_p, seed, mode):
            out = m(tokens, input_pos=input_pos)[:, -1]
            logits.append(out.clone())
            return sample(out, temperature, top_k, top_p, seed, input_pos, mode)

        llm = LLM.from_model(model, cache=cfg, batch_size=len(batch))
        llm.step = step
        out = llm.generate([{"prompt": p} for p in batch], max_new_tokens=new, temperature=0)
        return [c.token_ids for c in out], torch.stack(logits, 1)

    batch_tokens, batch_logits = run(prompts)
    for i, p in enumerate(prompts):
        alone_tokens, alone_logits = run([p])
        assert alone_tokens[0] == batch_tokens[i]
        assert torch.allclose(alone_logits[0], batch_logits[i], rtol=0, atol=1e-5), \
            f"prompt {i}: max diff {(alone_logits[0] - batch_logits[i]).abs().max().item()}"
    assert len(prompts[0]) + new > 32  # the shortest prompt's slot flushed too (at length R = 32)


# ---------------------------------------------------------------- attention


ATTN_CASES = [  # bits_k, bits_v, Hq, H, n_sink
    pytest.param(2, 2, 4, 2, 0, id="kivi2-gqa2"),
    pytest.param(4, 4, 6, 2, 0, id="kivi4-gqa3"),
    pytest.param(2, 2, 2, 2, 3, id="kivi2-mha-sinks3"),
    pytest.param(4, 2, 4, 1, 3, id="k4v2-mqa-sinks3"),
]


@pytest.mark.parametrize("lens", [[5, 40, 70], [20, 20]], ids=["lengths-apart", "slots-alike"])
@pytest.mark.parametrize("bits_k,bits_v,Hq,H,S", ATTN_CASES)
def test_decode_attention_equals_dense_dequantize_then_attend(bits_k, bits_v, Hq, H, S, lens):
    """Through flushes and ring wraps; slots all at one length (batch 1's case) take the
    reference's path that reads the store and the ring's runs side by side."""
    G, R, D, B = 16, 32, 32, len(lens)
    gen = torch.Generator().manual_seed(41)
    cache = KiviCache(B, H, D, 120, bits_k, bits_v, G, R, S, torch.float32)
    for b, T in enumerate(lens):
        prefill(cache, [b], kv_tokens(gen, (1, H, T, D)), kv_tokens(gen, (1, H, T, D)))
    pos = torch.tensor(lens)
    for _ in range(45):
        q = kv_tokens(gen, (B, Hq, D))
        out = cache.decode(q, kv_tokens(gen, (B, H, D)), kv_tokens(gen, (B, H, D)), pos)
        pos = pos + 1
        for b in range(B):
            K, V = cache_view(cache, b, int(pos[b]))
            assert (out[b].double() - dense_attention(q[b], K, V)).abs().max() <= attention_tol(q[b], K, V)


@pytest.mark.parametrize("S", [0, 3])
def test_kivi_attention_equals_static_cache_while_nothing_is_quantized(S):
    G, R, H, Hq, D = 16, 64, 2, 4, 32
    gen = torch.Generator().manual_seed(51)
    lens = [1, 10, 30]
    kivi = KiviCache(3, H, D, 80, 2, 2, G, R, S, torch.float32)
    fp = StaticCache(3, H, D, 80, torch.float32)
    for b, T in enumerate(lens):
        k, v = kv_tokens(gen, (1, H, T, D)), kv_tokens(gen, (1, H, T, D))
        prefill(kivi, [b], k, v)
        prefill(fp, [b], k, v)
    pos = torch.tensor(lens)
    while int(pos.max()) < R - 1:  # lengths stay below R: nothing quantized
        q, k, v = kv_tokens(gen, (3, Hq, D)), kv_tokens(gen, (3, H, D)), kv_tokens(gen, (3, H, D))
        a, b = kivi.decode(q, k, v, pos), fp.decode(q, k, v, pos)
        pos = pos + 1
        for i in range(3):
            K, V = fp.k_cache[i, :, : int(pos[i])], fp.v_cache[i, :, : int(pos[i])]
            assert (a[i] - b[i]).abs().max() <= attention_tol(q[i], K, V)
    assert int(n_quantized(pos, R, G).max()) == 0


def test_decode_attention_reference_reads_a_long_cache_chunk_by_chunk(monkeypatch):
    """A cache longer than CHUNK_TOKENS matches the dense reference, and the store is
    dequantized at most CHUNK_TOKENS tokens at a time (never one full fp copy)."""
    sizes = []

    def spy(fn):
        def wrapped(packed, scale, mn, bits, G):
            out = fn(packed, scale, mn, bits, G)
            sizes.append(out.shape[-2])
            return out
        return wrapped

    monkeypatch.setattr(reference, "dequantize_keys", spy(dequantize_keys))
    monkeypatch.setattr(reference, "dequantize_values", spy(dequantize_values))
    G, R, H, Hq, D = 32, 64, 1, 2, 32
    T = 2 * CHUNK_TOKENS + 100
    gen = torch.Generator().manual_seed(61)
    cache = KiviCache(1, H, D, T + 1, 2, 2, G, R, 3, torch.float32)
    prefill(cache, [0], kv_tokens(gen, (1, H, T, D)), kv_tokens(gen, (1, H, T, D)))
    q = kv_tokens(gen, (1, Hq, D))
    out = cache.decode(q, kv_tokens(gen, (1, H, D)), kv_tokens(gen, (1, H, D)), torch.tensor([T]))
    K, V = cache_view(cache, 0, T + 1)
    assert (out[0].double() - dense_attention(q[0], K, V)).abs().max() <= attention_tol(q[0], K, V)
    nq = n_q_of(T + 1, R, G)
    assert len(sizes) >= 2 * 2 and max(sizes) <= CHUNK_TOKENS
    assert sum(sizes) == 2 * nq  # keys and values, every quantized token once


def test_decode_attention_reference_long_fp_ring_matches_dense():
    H, Hq, D, T = 2, 4, 16, CHUNK_TOKENS + 300
    gen = torch.Generator().manual_seed(62)
    fp = StaticCache(1, H, D, T + 1, torch.float32)
    k, v = kv_tokens(gen, (1, H, T, D)), kv_tokens(gen, (1, H, T, D))
    prefill(fp, [0], k, v)
    q, kn, vn = kv_tokens(gen, (1, Hq, D)), kv_tokens(gen, (1, H, D)), kv_tokens(gen, (1, H, D))
    out = fp.decode(q, kn, vn, torch.tensor([T]))
    K, V = torch.cat([k[0], kn[0][:, None]], 1), torch.cat([v[0], vn[0][:, None]], 1)
    assert (out[0].double() - dense_attention(q[0], K, V)).abs().max() <= attention_tol(q[0], K, V)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(head_dim=64, bits_k=2, bits_v=2, group_size=32, residual_len=100, n_sink=0), r"residual.*100.*32"),
    (dict(head_dim=48, bits_k=2, bits_v=2, group_size=32, residual_len=128, n_sink=0), r"head_dim 48.*32"),
    (dict(head_dim=24, bits_k=4, bits_v=2, group_size=8, residual_len=64, n_sink=0), r"head_dim 24.*16"),
    (dict(head_dim=112, bits_k=2, bits_v=2, group_size=7, residual_len=63, n_sink=0), r"group size 7.*even"),
    (dict(head_dim=64, bits_k=3, bits_v=2, group_size=32, residual_len=128, n_sink=0), r"bit width 3\b"),
    (dict(head_dim=64, bits_k=2, bits_v=16, group_size=32, residual_len=128, n_sink=0), r"bit width 16\b"),
    (dict(head_dim=64, bits_k=2, bits_v=2, group_size=32, residual_len=128, n_sink=32), r"sink.*32"),
    (dict(head_dim=64, bits_k=2, bits_v=2, group_size=32, residual_len=128, n_sink=-1), r"sink.*-1"),
])
def test_bad_kivi_configuration_raises_a_clear_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_kivi_config(**kwargs)
    with pytest.raises(ValueError, match=pattern):
        KiviCache(1, 2, kwargs["head_dim"], 256, kwargs["bits_k"], kwargs["bits_v"], kwargs["group_size"],
                  kwargs["residual_len"], kwargs["n_sink"])


def test_make_cache_rejects_a_residual_not_a_multiple_of_the_group():
    with pytest.raises(ValueError, match=r"100.*32"):
        make_cache("kivi2", 1, 2, 64, 256, torch.float16, "cpu", group_size=32, residual_len=100)


@pytest.mark.parametrize("mode", ["kivi3", "int8", "k3v2", "k8v8x", "kivi", ""])
def test_unknown_kv_mode_raises_naming_the_mode(mode):
    with pytest.raises(ValueError, match=rf"unknown --kv mode '{mode}'"):
        parse_kv_mode(mode)
    with pytest.raises(ValueError, match=rf"'{mode}'"):
        make_cache(mode, 1, 2, 64, 256, torch.float16, "cpu")


@pytest.mark.parametrize("mode,expected", [("fp16", None), ("kivi2", (2, 2)), ("kivi4", (4, 4)),
                                           ("k4v2", (4, 2)), ("k2v4", (2, 4)), ("KIVI2", (2, 2))])
def test_kv_modes_parse_to_key_and_value_bits(mode, expected):
    assert parse_kv_mode(mode) == expected


# ---------------------------------------------------------------- memory accounting


def allocated_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n_sink", [0, 3])
@pytest.mark.parametrize("mode", ["fp16", "kivi2", "kivi4", "k4v2"])
def test_cache_bytes_equals_the_buffers_make_cache_allocates_per_slot(mode, n_sink, dtype):
    H, D, L, G, R, B = 3, 64, 100, 32, 64, 2  # L not a multiple of G
    cache = make_cache(mode, B, H, D, L, dtype, "cpu", G, R, n_sink)
    assert allocated_bytes(cache) == B * cache_bytes(mode, H, D, L, dtype, G, R, n_sink)


@pytest.mark.parametrize("mode,bits_per_element", [("fp16", 16), ("kivi2", 3), ("kivi4", 5), ("k4v2", 4)])
def test_cache_bytes_matches_design_bits_per_element(mode, bits_per_element):
    """At G = 32, fp16 statistics: 2-bit costs 3 bits/element, 4-bit 5 bits;
    plus the fp16 ring (and sinks) of R (+ S) tokens for K and V."""
    H, D, L, G, R, S = 2, 64, 32 * 64, 32, 128, 3
    ring = 0 if mode == "fp16" else 2 * H * (R + S) * D * 2
    expected = 2 * H * L * D * bits_per_element // 8 + ring
    assert cache_bytes(mode, H, D, L, torch.float16, G, R, S) == expected
