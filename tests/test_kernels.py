"""The Triton cache kernels against kernels/reference.py. Without CUDA they run on CPU tensors
under TRITON_INTERPRET=1 (conftest.py). States are built the way the flush rule builds them:
groups of G tokens quantized from token 0 (sinks hidden from group 0's key ranges), the newest
length - n_q tokens in the ring at p % R. Memory the kernels must not read is poisoned with NaN;
their internal buffers and outputs start as NaN too."""

import sys

import pytest
import torch

from kernels.decode_attention import decode_attention, mma_attention, wgmma_attention
from kernels.quantize import flush, quantize_prompt
from kernels.reference import decode_attention_reference, flush_reference, hide_sinks, quantize_prompt_reference
from kivi_cache import n_quantized
from quantize_kv import quantize_keys, quantize_values

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative L2 error
# the interpreter rounds fp32 -> bf16 by truncation, so bf16 codes can differ from torch's there
EXACT_DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())


def cache_state(lengths, H, Hq, D, L, R, S, G, bits_k, bits_v, dtype, fill, seed=0):
    """(q, cache buffers..., lengths, n_quantized) for the op; `fill` goes wherever no live
    token is (packed store past n_q, ring slots outside [n_q, length))."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    k = torch.randn(B, H, L, D, generator=g) + torch.randn(1, 1, 1, D, generator=g) * 3  # outlier channels
    v = torch.randn(B, H, L, D, generator=g)
    k, v = k.to(dtype), v.to(dtype)
    nq = [n_quantized(n, R, G) for n in lengths]
    kp, ks, km = quantize_keys(hide_sinks(k, torch.zeros(B, dtype=torch.long), S), bits_k, G)
    vp, vs, vm = quantize_values(v, bits_v, G)
    k_ring = torch.full((B, H, R, D), fill, dtype=dtype)
    v_ring = k_ring.clone()
    for b, (n, q_n) in enumerate(zip(lengths, nq)):
        ks[b, :, q_n // G :], km[b, :, q_n // G :], vs[b, ..., q_n:], vm[b, ..., q_n:] = fill, fill, fill, fill
        kp[b, :, q_n:], vp[b, :, q_n:] = -1, -1
        idx = torch.arange(q_n, n) % R
        k_ring[b, :, idx], v_ring[b, :, idx] = k[b, :, q_n:n], v[b, :, q_n:n]
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    bufs = (q, k_ring, v_ring, k[:, :, :S].contiguous(), v[:, :, :S].contiguous(), kp, ks, km, vp, vs, vm)
    bufs = tuple(t.to(DEVICE) for t in bufs)
    as_dev = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)
    return (*bufs, as_dev(list(lengths)), as_dev(nq))


@pytest.fixture
def nan_allocations(monkeypatch):
    """Make the kernel module's torch.empty / empty_like return NaN-filled tensors."""
    mod = sys.modules["kernels.decode_attention"]
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    class Torch:  # the module's view of torch: everything as is but the two allocators
        def __getattr__(self, name):
            return {"empty": nan_empty, "empty_like": nan_empty_like}.get(name) or getattr(torch, name)

    monkeypatch.setattr(mod, "torch", Torch())


def check_attention(lengths, H, Hq, D, L, R, S, G, bits, dtype, num_splits=None, window=0, **knobs):
    bits_k, bits_v = bits
    sm_scale = D**-0.5
    ref = decode_attention_reference(*cache_state(lengths, H, Hq, D, L, R, S, G, bits_k, bits_v, dtype, 0.0),
                                     bits_k, bits_v, G, sm_scale, window)
    args = cache_state(lengths, H, Hq, D, L, R, S, G, bits_k, bits_v, dtype, float("nan"))
    out = decode_attention(*args, bits_k, bits_v, G, sm_scale, window, num_splits=num_splits, **knobs)
    assert not out.isnan().any()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < TOL[dtype], err


# lengths: 1 token; under R (nothing quantized, ring partly full); just flushed; mid-group;
# none a multiple of any block
@pytest.mark.parametrize(
    "H, Hq, D, G, bits, S, dtype",
    [
        (2, 2, 64, 32, (2, 2), 4, torch.float32),
        (2, 2, 128, 32, (4, 4), 0, torch.float32),
        (2, 6, 64, 32, (4, 2), 4, torch.float16),
        (1, 8, 128, 64, (2, 4), 0, torch.float16),
        (2, 4, 64, 64, (2, 2), 4, torch.bfloat16),
        (2, 2, 128, 32, (8, 8), 4, torch.float16),
    ],
)
def test_decode_attention(nan_allocations, H, Hq, D, G, bits, S, dtype):
    R = 2 * G
    check_attention((1, R - 3, R, R + G + 5, 7 * G + 13), H, Hq, D, 8 * G, R, S, G, bits, dtype)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_decode_attention_splits(nan_allocations, num_splits):
    """Splits cut the packed store and the ring between programs; one slot ends in split 0."""
    check_attention((3, 100, 300, 511), 2, 4, 64, 512, 64, 4, 32, (2, 2), torch.float32, num_splits)


# windows inside the ring, across sinks and packed store, mid-group; lengths below and above
@pytest.mark.parametrize("window, S, num_splits", [(27, 4, None), (3 * 32 + 7, 4, 3), (200, 0, None), (1, 0, 2)])
def test_decode_attention_sliding_window(nan_allocations, window, S, num_splits):
    """A sliding window attends each slot's last `window` positions, on every split count."""
    check_attention((1, 20, 64, 101, 300, 511), 2, 4, 64, 512, 64, S, 32, (2, 2), torch.float32, num_splits,
                    window)


def test_sliding_window_plain_cache(nan_allocations):
    """On a plain cache the window is plain attention over the last `window` keys and values."""
    B, H, Hq, D, L, window = 3, 2, 4, 64, 200, 37
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(B, H, L, D, generator=g).to(DEVICE) for _ in range(2))
    q = torch.randn(B, Hq, D, generator=g).to(DEVICE)
    lengths = [5, 37, 190]
    e = lambda *s, dtype=torch.float32: torch.empty(B, H, 0, *s, dtype=dtype, device=DEVICE)
    args = (q, k, v, e(D), e(D), e(D, dtype=torch.int32), e(D), e(D), e(D // 16, dtype=torch.int32), e(D // 32).mT,
            e(D // 32).mT, torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
            torch.zeros(B, dtype=torch.int32, device=DEVICE), 2, 2, 32, D**-0.5, window)
    for b, n in enumerate(lengths):
        keys, values = (x[b, :, max(0, n - window) : n].repeat_interleave(Hq // H, 0) for x in (k, v))
        want = torch.softmax(q[b, :, None] @ keys.transpose(1, 2) * D**-0.5, -1) @ values  # [Hq, 1, D]
        for out in (decode_attention_reference(*args), decode_attention(*args)):
            torch.testing.assert_close(out[b], want[:, 0], rtol=1e-5, atol=1e-5)


GPU = pytest.mark.skipif(DEVICE != "cuda", reason="the tensor-core kernel needs a CUDA GPU; "
                         "scripts/check_gpu.py runs these tests there")

# head groupings from MHA (1) to MQA (128 query heads on one kv head), both head sizes, both
# bit widths for keys and values, every group size, sinks or none, both 16-bit dtypes
TENSOR_CORE_CASES = [
    (2, 2, 128, 32, (2, 2), 4, torch.bfloat16),
    (2, 2, 64, 64, (4, 4), 0, torch.float16),
    (3, 9, 64, 32, (2, 2), 4, torch.bfloat16),
    (2, 8, 128, 32, (4, 2), 0, torch.bfloat16),
    (1, 8, 128, 128, (2, 4), 4, torch.float16),
    (2, 16, 64, 32, (2, 2), 4, torch.float16),
    (1, 16, 128, 64, (4, 4), 4, torch.bfloat16),
    (1, 32, 128, 32, (2, 2), 0, torch.bfloat16),
    (1, 71, 64, 32, (2, 2), 4, torch.bfloat16),
    (1, 71, 64, 64, (4, 2), 0, torch.float16),
    (1, 128, 128, 32, (2, 4), 4, torch.bfloat16),
    (1, 128, 64, 32, (4, 4), 0, torch.float16),
    (1, 48, 128, 128, (4, 4), 4, torch.bfloat16),
    (2, 64, 64, 64, (2, 4), 0, torch.bfloat16),
]


@GPU
@pytest.mark.parametrize("H, Hq, D, G, bits, S, dtype", TENSOR_CORE_CASES)
def test_decode_attention_tensor_cores(nan_allocations, H, Hq, D, G, bits, S, dtype):
    """The tensor-core path equals the reference: lengths of 1 token, under R, just flushed,
    mid-group and long, none a multiple of any block; every slot at its own length."""
    R = 2 * G
    lengths = (1, R - 3, R, R + G + 5, 7 * G + 13, 20 * G + 31)
    check_attention(lengths, H, Hq, D, 24 * G, R, S, G, bits, dtype, tensor_cores=True)


@GPU
@pytest.mark.parametrize("H, Hq, D, G, bits, S, window", [
    (2, 8, 128, 32, (2, 2), 4, 45), (2, 8, 128, 32, (2, 2), 0, 500), (1, 71, 64, 64, (4, 2), 4, 333)])
def test_decode_attention_tensor_cores_window(nan_allocations, H, Hq, D, G, bits, S, window):
    """Sliding windows on the tensor-core path: inside the ring, mid-block of the store."""
    R = 2 * G
    lengths = (1, R - 3, R, R + G + 5, 7 * G + 13, 20 * G + 31)
    check_attention(lengths, H, Hq, D, 24 * G, R, S, G, bits, torch.bfloat16, window=window, tensor_cores=True)


@GPU
@pytest.mark.parametrize("num_splits", [1, 3, 40])
def test_decode_attention_tensor_cores_splits(nan_allocations, num_splits):
    """Any split count covers every packed position once, more splits than blocks included."""
    check_attention((5, 300, 1000, 2049), 2, 8, 128, 2304, 64, 4, 32, (2, 2), torch.bfloat16, num_splits,
                    tensor_cores=True)


@pytest.mark.skipif(mma_attention is None, reason="needs Gluon (Triton 3.6 or later)")
def test_tensor_core_residency_and_splits():
    """Programs an SM holds: 12 at 168 registers (2-bit, 228 KB of shared memory an SM), 10 at
    4 bits (shared memory binds), 8 uncapped; the default split count fills whole waves."""
    smem, sms = 228 * 1024, 132
    assert mma_attention.programs_per_sm(128, 32, 2, 2, 4, mma_attention.register_cap(128, 2, 2, 4), smem) == 12
    assert mma_attention.programs_per_sm(128, 32, 4, 4, 4, 168, smem) == 10
    assert mma_attention.programs_per_sm(64, 32, 4, 4, 71, None, smem) == 8
    assert mma_attention.default_splits(256, 4, 8192, 12 * sms) == 6  # 1536 programs: one wave of 1584
    assert mma_attention.default_splits(1024, 1, 4096, 12 * sms) == 3  # 2 splits: 1.3 waves, the second short
    assert mma_attention.default_splits(64, 71, 8192, 12 * sms) % 5 == 0  # whole 16-head chunks of 71


@pytest.mark.skipif(wgmma_attention is None, reason="needs Gluon (Triton 3.6 or later)")
def test_wide_group_chunks_and_fit():
    """Wide groups: the heads in at most two power-of-2 chunks (71 -> 64 + 8); the kernel takes
    the widths whose accumulators fit the registers, and its splits fill whole waves."""
    assert [wgmma_attention._chunk_widths(h) for h in (17, 32, 48, 71, 96)] == [(16, 8), (32, 0), (32, 16), (64, 8),
                                                                              (64, 32)]
    assert [wgmma_attention.fits(h, 64) for h in (16, 17, 71, 96, 97, 128)] == [False, True, True, True, False, False]
    assert [wgmma_attention.fits(h, 128) for h in (48, 64, 71)] == [True, True, False]
    assert wgmma_attention.default_splits(64, 8192, 132) == 4  # 256 programs: one wave of 264 (2 an SM)


@GPU
@pytest.mark.parametrize("Hq, H, D, window", [(32, 8, 128, 0), (71, 1, 64, 100), (8, 8, 128, 257)])
def test_packed_prefill_attention_flash_varlen(Hq, H, D, window):
    """Prefill's varlen flash attention over packed prompts equals causal attention prompt by
    prompt in float32 (kv heads grouped, windows shorter and longer than prompts)."""
    from model import causal_attention, packed_attention

    lengths = [1, 77, 300, 513, 64]
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(sum(lengths), h, D, generator=g) for h in (Hq, H, H))
    out = packed_attention(*(t.to(DEVICE, torch.bfloat16) for t in (q, k, v)), lengths, window).float().cpu()
    for i, n in enumerate(lengths):
        start = sum(lengths[:i])
        want = causal_attention(*(t[start : start + n].transpose(0, 1)[None] for t in (q, k, v)), window)[0]
        torch.testing.assert_close(out[start : start + n], want.transpose(0, 1), rtol=2e-2, atol=2e-2)


def test_plain_cache(nan_allocations):
    """The fp16 cache: n_q = 0, a ring of R = max_seq_len, empty sinks and packed store."""
    B, H, Hq, D, L = 3, 2, 6, 64, 300
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(B, H, L, D, generator=g).half().to(DEVICE) for _ in range(2))
    e = lambda *s, dtype=torch.float16: torch.empty(B, H, 0, *s, dtype=dtype, device=DEVICE)
    args = (torch.randn(B, Hq, D, generator=g).half().to(DEVICE), k, v, e(D), e(D), e(D, dtype=torch.int32), e(D),
            e(D), e(D // 16, dtype=torch.int32), e(D // 32).mT, e(D // 32).mT,
            torch.tensor([1, 77, 300], dtype=torch.int32, device=DEVICE), torch.zeros(B, dtype=torch.int32, device=DEVICE),
            2, 2, 32, D**-0.5)
    out = decode_attention(*args)
    ref = decode_attention_reference(*args)
    assert not out.isnan().any()
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < TOL[torch.float16]


def test_batch_independence_and_empty_slot(nan_allocations):
    """A slot's output does not depend on the other slots; a slot of length 0 gives zeros."""
    args = cache_state((0, 150, 77), 2, 2, 64, 256, 64, 4, 32, 2, 2, torch.float32, float("nan"))
    out = decode_attention(*args, 2, 2, 32, 0.125)
    alone = decode_attention(*(t[1:2] for t in args), 2, 2, 32, 0.125)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.allclose(out[1], alone[0], rtol=1e-6, atol=1e-6)


def random_store(B, H, L, D, G, bits_k, bits_v, dtype, g):
    """Packed store buffers of random bits (what a kernel does not write must stay as is)."""
    bufs = [torch.randint(-2**31, 2**31 - 1, (B, H, L, D * bits_k // 32), generator=g, dtype=torch.int32),
            torch.randn(B, H, L // G, D, generator=g).to(dtype), torch.randn(B, H, L // G, D, generator=g).to(dtype),
            torch.randint(-2**31, 2**31 - 1, (B, H, L, D * bits_v // 32), generator=g, dtype=torch.int32),
            torch.randn(B, H, D // G, L, generator=g).to(dtype), torch.randn(B, H, D // G, L, generator=g).to(dtype)]
    return [t.to(DEVICE) for t in bufs]


def assert_same_bits(got_bufs, want_bufs):
    bits = lambda t: t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    for got, want in zip(got_bufs, want_bufs):
        assert torch.equal(bits(got), bits(want))


QUANTIZE_CASES = [
    (64, 32, (2, 2), 4, torch.float32, False),
    (128, 64, (4, 2), 0, torch.float16, True),
    (64, 32, (2, 4), 4, torch.bfloat16, True),
    (64, 64, (8, 8), 4, torch.float16, False),
]


def random_kv(shape, D, G, const, dtype, g):
    """Keys with outlier channels and values; `const` makes constant groups (scale 0, codes 0)."""
    k = torch.randn(*shape, D, generator=g) * 3
    v = torch.randn(*shape, D, generator=g)
    if const:
        k[..., :3] = 1.25
        v[..., :G] = -0.5
    return k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE)


@pytest.mark.parametrize("D, G, bits, S, dtype, const", QUANTIZE_CASES)
def test_flush(D, G, bits, S, dtype, const):
    """Bit for bit on codes, scales and mins; untouched where the predicate is false. Slots:
    group 0 (sinks hidden), a later group, one token past due, not yet full."""
    if dtype not in EXACT_DTYPES:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16; bf16 is checked on CUDA")
    bits_k, bits_v = bits
    B, H, R, L = 4, 2, 2 * G, 8 * G
    g = torch.Generator().manual_seed(2)
    k_ring, v_ring = random_kv((B, H, R), D, G, const, dtype, g)
    bufs = random_store(B, H, L, D, G, bits_k, bits_v, dtype, g)
    want = [t.clone() for t in bufs]
    lengths = torch.tensor([R, R + 3 * G, R + G + 1, R - 1], dtype=torch.int32, device=DEVICE)
    flush_reference(k_ring, v_ring, *want, lengths, bits_k, bits_v, G, S)
    flush(k_ring, v_ring, *bufs, lengths, bits_k, bits_v, G, S)
    assert_same_bits(bufs, want)


@pytest.mark.parametrize("D, G, bits, S, dtype, const", QUANTIZE_CASES)
def test_quantize_prompt(D, G, bits, S, dtype, const):
    """Bit for bit: three prompts packed along one token axis, k, v [N, H, D] strided views
    as the model makes them, into slots 3, 0 and 1 of 4: 3 groups and 1 group with tokens left
    over, and a prompt too short for a group; the other slot, the leftover tokens' positions
    and the short prompt's slot untouched."""
    if dtype not in EXACT_DTYPES:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16; bf16 is checked on CUDA")
    bits_k, bits_v = bits
    B, H, L = 4, 2, 5 * G
    lengths, slots, counts = [3 * G + 5, G + 1, G - 1], [3, 0, 1], [3 * G, G, 0]
    g = torch.Generator().manual_seed(3)
    k_all, v_all = random_kv((sum(lengths), 2 * H), D, G, const, dtype, g)
    k, v = k_all[:, H:], v_all[:, :H]  # [N, H, D], a token's heads one run of a wider row
    firsts = [0, lengths[0], lengths[0] + lengths[1]]
    prompts = torch.tensor([list(row) for row in zip(firsts, slots, counts)], dtype=torch.int32, device=DEVICE)
    bufs = random_store(B, H, L, D, G, bits_k, bits_v, dtype, g)
    before = [t.clone() for t in bufs]
    want = [t.clone() for t in bufs]
    quantize_prompt_reference(k, v, prompts, 3 * G, *want, bits_k, bits_v, G, S)
    quantize_prompt(k, v, prompts, 3 * G, *bufs, bits_k, bits_v, G, S)
    assert_same_bits(bufs, want)
    assert_same_bits([t[1:3] for t in bufs], [t[1:3] for t in before])  # the short prompt's slot, the other
    for slot, count in ((3, 3 * G), (0, G)):  # past each count: packed rows, key groups, value columns
        assert_same_bits([bufs[0][slot, :, count:], bufs[1][slot, :, count // G:], bufs[4][slot, ..., count:]],
                         [before[0][slot, :, count:], before[1][slot, :, count // G:], before[4][slot, ..., count:]])


def test_quantize_prompt_bad_input():
    """Wrong dtype, more tokens than the store holds, a prompt table of the wrong type: clear errors, no launch."""
    g = torch.Generator().manual_seed(4)
    B, H, D, G, L = 2, 2, 64, 32, 2 * 32
    bufs = random_store(B, H, L, D, G, 2, 2, torch.float16, g)
    k = torch.randn(G, H, D, generator=g).half().to(DEVICE)
    prompts = torch.tensor([[0, 1, G]], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        quantize_prompt(k.float(), k.float(), prompts, G, *bufs, 2, 2, G, 0)
    long = torch.randn(L + G, H, D, generator=g).half().to(DEVICE)
    with pytest.raises(ValueError, match="within"):
        quantize_prompt(long, long, prompts, L + G, *bufs, 2, 2, G, 0)
    with pytest.raises(ValueError, match="prompts"):
        quantize_prompt(k, k, prompts.long(), G, *bufs, 2, 2, G, 0)
