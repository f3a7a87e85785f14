"""Quantization and bit packing of quantize_kv.py.

Round-trip error bounds, the stored statistics, the documented packed layouts (checked
against words computed by hand or with Python integers), no spilling between codes,
constant groups, and the errors for shapes and bit widths the format cannot hold.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize_kv import (
    dequantize,
    dequantize_keys,
    dequantize_values,
    pack,
    quantize,
    quantize_keys,
    quantize_values,
    unpack,
)

BITS = (2, 4, 8)
FAST = settings(max_examples=40, deadline=None)

# Unit roundoff and smallest subnormal spacing of the storage dtypes.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TINY = {torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def random_data(shape, seed, magnitude, pattern, dtype=torch.float32):
    """Never all zeros: a nonzero offset plus noise, optionally with outliers or ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if pattern == "outliers":
        x = torch.where(torch.rand(shape, generator=g) < 0.1, x * 20, x)  # fp16-safe at magnitude 300
    elif pattern == "few_levels":  # many ties, some constant groups
        x = torch.round(x)
    x = (x + 0.37) * magnitude
    x = x.to(dtype)
    assert x.abs().max() > 0
    return x


def to_signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def check_round_trip(x, x_hat, scale, mn, bits, group_size, dim):
    """Per element: |x - x_hat| <= scale / 2 + storage rounding, and the statistics are the
    group's own min and (max - min) / (2^bits - 1).

    float32: rounding of the float32 arithmetic only (a few ulps of |x|, |min|, M*scale).
    fp16 / bf16 (unit roundoff u): scale is stored rounded, so a code at the top of the grid
    can be off by up to M * u * scale (M = 2^bits - 1); x_hat is stored rounded (u * |x_hat|);
    fp16 adds subnormal spacing 2^-24 for each rounded quantity.
    """
    dtype = x.dtype
    u, tiny = UNIT_ROUNDOFF[dtype], TINY[dtype]
    max_code = 2**bits - 1
    assert scale.dtype == dtype and mn.dtype == dtype and x_hat.dtype == dtype
    assert x_hat.shape == x.shape
    xf, xh = x.double(), x_hat.double()
    grouped = xf.unflatten(dim, (x.shape[dim] // group_size, group_size))
    g_min, g_max = grouped.amin(dim + 1), grouped.amax(dim + 1)
    # min is the group's own min (exact: x is already in the storage dtype)
    assert torch.equal(mn.double(), g_min)
    # scale is (max - min) / M, computed in float32 (subtract, divide) and rounded to the dtype
    true_scale = (g_max - g_min) / max_code
    assert torch.all((scale.double() - true_scale).abs() <= (u + 3 * 2.0**-24) * true_scale + tiny)
    s = scale.double().repeat_interleave(group_size, dim=dim)
    m = mn.double().repeat_interleave(group_size, dim=dim)
    err = (xf - xh).abs()
    if dtype == torch.float32:
        bound = s / 2 + 4 * 2.0**-24 * (xf.abs() + m.abs() + max_code * s)
    else:
        bound = s / 2 + 1.01 * u * (max_code * s + xh.abs() + m.abs()) + (max_code + 2) * tiny
    assert not torch.isnan(x_hat).any()
    worst = (err - bound).max()
    assert worst <= 0, f"round-trip error exceeds the bound by {worst.item()}"


shape_prefix = st.lists(st.integers(1, 3), min_size=0, max_size=2)
magnitudes = st.sampled_from([1e-3, 1.0, 300.0])
patterns = st.sampled_from(["normal", "outliers", "few_levels"])
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@FAST
@given(bits=st.sampled_from(BITS), mult=st.integers(1, 3), n_groups=st.integers(1, 3), d=st.integers(1, 7),
       prefix=shape_prefix, magnitude=magnitudes, pattern=patterns, dtype=dtypes, seed=st.integers(0, 2**31))
def test_keys_per_channel_round_trip_within_half_scale(bits, mult, n_groups, d, prefix, magnitude, pattern, dtype,
                                                       seed):
    G = 2 * mult
    d = d * (32 // bits)  # channels fill whole words
    k = random_data((*prefix, n_groups * G, d), seed, magnitude, pattern, dtype)
    packed, scale, mn = quantize_keys(k, bits, G)
    assert packed.dtype == torch.int32 and packed.shape == (*prefix, n_groups * G, d * bits // 32)
    assert scale.shape == mn.shape == (*prefix, n_groups, d)  # one per (group of tokens, channel)
    k_hat = dequantize_keys(packed, scale, mn, bits, G)
    check_round_trip(k, k_hat, scale, mn, bits, G, dim=len(prefix))


@FAST
@given(bits=st.sampled_from(BITS), G=st.integers(1, 12), mult=st.integers(1, 2), t=st.integers(1, 3),
       prefix=shape_prefix, magnitude=magnitudes, pattern=patterns, dtype=dtypes, seed=st.integers(0, 2**31))
def test_values_per_token_round_trip_within_half_scale(bits, G, mult, t, prefix, magnitude, pattern, dtype, seed):
    unit = max(32 // bits, 8)  # whole words a token, and 8 channel classes
    D = G * unit // math.gcd(G, unit) * mult  # whole groups too
    t = 2 * t  # token pairs
    v = random_data((*prefix, t, D), seed, magnitude, pattern, dtype)
    packed, scale, mn = quantize_values(v, bits, G)
    assert packed.dtype == torch.int32 and packed.shape == (*prefix, t, D * bits // 32)
    assert scale.shape == mn.shape == (*prefix, D // G, t)  # one per (group of channels, token)
    v_hat = dequantize_values(packed, scale, mn, bits, G)
    check_round_trip(v, v_hat, scale.mT, mn.mT, bits, G, dim=len(prefix) + 1)


@FAST
@given(bits=st.sampled_from(BITS), G=st.integers(1, 9), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       dim_choice=st.integers(0, 2), magnitude=magnitudes, pattern=patterns, dtype=dtypes, seed=st.integers(0, 2**31))
def test_quantize_any_axis_round_trip_within_half_scale(bits, G, shape, dim_choice, magnitude, pattern, dtype, seed):
    dim = dim_choice % len(shape)
    shape[dim] *= G
    x = random_data(tuple(shape), seed, magnitude, pattern, dtype)
    codes, scale, mn = quantize(x, bits, G, dim)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert int(codes.max()) <= 2**bits - 1
    x_hat = dequantize(codes, scale, mn, G, dim)
    check_round_trip(x, x_hat, scale, mn, bits, G, dim)


def test_round_trip_of_a_group_with_one_huge_outlier_keeps_the_outlier():
    """Per-channel keys: the outlier channel's max is reproduced (it is code 2^bits - 1)."""
    k = random_data((2, 32, 16), 3, 1.0, "normal")
    k[:, 5, 7] = 1000.0
    for bits in BITS:
        k_hat = dequantize_keys(*quantize_keys(k, bits, 32), bits, 32)
        assert torch.allclose(k_hat[:, 5, 7], k[:, 5, 7], rtol=1e-5)


# ---------------------------------------------------------------- packing


@FAST
@given(bits=st.sampled_from(BITS), shape=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       dim_choice=st.integers(0, 2), mult=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_pack_unpack_lossless_any_shape_and_axis(bits, shape, dim_choice, mult, seed):
    dim = dim_choice % len(shape)
    shape[dim] = (32 // bits) * mult
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, tuple(shape), generator=g, dtype=torch.uint8)
    words = pack(codes, bits, dim)
    assert words.dtype == torch.int32
    assert words.shape[dim] == mult and words.numel() * 32 == codes.numel() * bits
    back = unpack(words, bits, dim)
    assert back.dtype == torch.uint8 and torch.equal(back, codes)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_lossless_for_every_code_value(bits):
    per_word = 32 // bits
    n = 2**bits * per_word  # every code value at every position of a word
    codes = (torch.arange(n) % 2**bits).to(torch.uint8)
    codes = codes[torch.randperm(n, generator=torch.Generator().manual_seed(bits))]
    codes = torch.stack([codes, codes.flip(0)])  # [2, n]
    assert torch.equal(unpack(pack(codes, bits, dim=-1), bits, dim=-1), codes)


def position_shift(i: int, bits: int) -> int:
    """Bit offset of position i of a word: pairs of positions share an offset, one per half."""
    return bits * (i // 2) + 16 * (i % 2)


@pytest.mark.parametrize("bits", BITS)
def test_max_code_at_each_word_position_never_spills_into_neighbours(bits):
    per_word, max_code = 32 // bits, 2**bits - 1
    for j in range(per_word):
        one = torch.zeros(per_word, dtype=torch.uint8)
        one[j] = max_code
        word = pack(one, bits, dim=0)
        assert word.tolist() == [to_signed32(max_code << position_shift(j, bits))]
        assert torch.equal(unpack(word, bits, dim=0), one)
        hole = torch.full((per_word,), max_code, dtype=torch.uint8)
        hole[j] = 0
        assert torch.equal(unpack(pack(hole, bits, dim=0), bits, dim=0), hole)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("bad", ["too_big", "way_too_big", "negative"])
def test_out_of_range_codes_are_clamped_not_bled_into_neighbours(bits, bad):
    per_word, max_code = 32 // bits, 2**bits - 1
    for j in range(per_word):
        if bad == "negative":  # neighbours at max: a negative code would set all their bits
            codes = torch.full((per_word,), max_code, dtype=torch.int64)
            codes[j] = -1
            expected = codes.clone()
            expected[j] = 0
        else:  # neighbours at 0: a too-big code would carry into the next code's bits
            codes = torch.zeros(per_word, dtype=torch.int64)
            codes[j] = max_code + 1 if bad == "too_big" else 1000 * max_code + 7
            expected = torch.zeros(per_word, dtype=torch.int64)
            expected[j] = max_code
        assert unpack(pack(codes, bits, dim=0), bits, dim=0).tolist() == expected.tolist()


def test_packed_word_matches_hand_computed_pair_order():
    """Position i at bit bits * (i // 2) + 16 * (i % 2): even positions in the low half-word,
    odd ones in the high half, each pair at the same offset."""
    # 4 bits: codes 0..7 -> low half 0, 2, 4, 6 (nibbles), high half 1, 3, 5, 7
    codes = torch.arange(8, dtype=torch.uint8)
    assert pack(codes, 4, dim=0).tolist() == [to_signed32(0x75316420)]
    # 2 bits, codes i % 4: low half holds 0, 2, 0, 2, ... ; high half 1, 3, 1, 3, ...
    codes = (torch.arange(16) % 4).to(torch.uint8)
    assert pack(codes, 2, dim=0).tolist() == [to_signed32(0xDDDD8888)]
    # 8 bits: codes 0x11, 0x22, 0x33, 0x44 -> low half 0x33 0x11, high half 0x44 0x22
    codes = torch.tensor([0x11, 0x22, 0x33, 0x44], dtype=torch.uint8)
    assert pack(codes, 8, dim=0).tolist() == [to_signed32(0x44223311)]


def python_pack(codes: list[int], bits: int) -> list[int]:
    per_word = 32 // bits
    return [to_signed32(sum(codes[w * per_word + i] << position_shift(i, bits) for i in range(per_word)))
            for w in range(len(codes) // per_word)]


@pytest.mark.parametrize("bits", BITS)
def test_pack_along_first_axis_uses_the_pair_order(bits):
    per_word = 32 // bits
    g = torch.Generator().manual_seed(7 + bits)
    codes = torch.randint(0, 2**bits, (2 * per_word, 3), generator=g, dtype=torch.uint8)
    words = pack(codes, bits, dim=0)
    for c in range(3):
        assert words[:, c].tolist() == python_pack(codes[:, c].tolist(), bits)


@pytest.mark.parametrize("bits", BITS)
def test_quantize_keys_layout_packs_each_tokens_channels(bits):
    """k_packed [T, D * bits / 32]: a token's D channels packed in order (pairs in the halves)."""
    G, T, D = 4, 8, 2 * 32 // bits
    k = random_data((T, D), 11, 1.0, "normal")
    packed, _, _ = quantize_keys(k, bits, G)
    codes, _, _ = quantize(k, bits, G, dim=0)
    for t in range(T):
        assert packed[t].tolist() == python_pack(codes[t].tolist(), bits)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("D", [32, 64, 128])
def test_quantize_values_layout_pairs_tokens_by_channel_class(bits, D):
    """v_packed rows 2p, 2p+1: one run of words; channel c is slot n = (c % 8) * D / 8 + c // 8,
    word n // SPW at slot n % SPW, token 2p at bits * slot, token 2p+1 sixteen bits higher."""
    T, G, spw = 6, 16, 16 // bits
    v = random_data((T, D), 12, 1.0, "normal")
    packed, _, _ = quantize_values(v, bits, G)
    codes, _, _ = quantize(v, bits, G, dim=-1)
    assert packed.shape == (T, D * bits // 32)
    for p in range(T // 2):
        run = [w & 0xFFFFFFFF for w in packed[2 * p : 2 * p + 2].flatten().tolist()]
        for c in range(D):
            n = (c % 8) * (D // 8) + c // 8
            word, slot = run[n // spw], n % spw
            assert (word >> (bits * slot)) & (2**bits - 1) == codes[2 * p, c]
            assert (word >> (bits * slot + 16)) & (2**bits - 1) == codes[2 * p + 1, c]


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_into_a_view_equals_the_returned_tensor_bit_for_bit(bits):
    """out=: keys and values written into a strided view of a larger buffer (as the CPU attention
    reference does) are the very floats the plain call returns, and nothing else is touched."""
    G, T, D = 32, 96, 64
    k, v = (random_data((2, 3, T, D), seed, 1.0, "normal") for seed in (21, 22))
    for (packed, scale, x_min), dequant in ((quantize_keys(k, bits, G), dequantize_keys),
                                            (quantize_values(v, bits, G), dequantize_values)):
        buffer = torch.full((2, 3, T + 40, D), 7.0)
        dequant(packed, scale, x_min, bits, G, out=buffer[:, :, :T])
        assert torch.equal(buffer[:, :, :T], dequant(packed, scale, x_min, bits, G))
        assert torch.all(buffer[:, :, T:] == 7.0)


def test_dequantize_into_a_tensor_refuses_scales_it_would_have_to_round():
    packed, scale, k_min = quantize_keys(random_data((16, 32), 23, 1.0, "normal", torch.float16), 2, 16)
    with pytest.raises(ValueError, match="float32 scales and out only"):
        dequantize_keys(packed, scale, k_min, 2, 16, out=torch.empty(16, 32))


# ---------------------------------------------------------------- constant groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("value", [-3.75, 0.0, 1e-3, 1000.0, -6e4])
def test_constant_group_dequantizes_exactly_to_its_value(dtype, bits, value):
    G = max(32 // bits, 8)
    k = random_data((2, 2 * G, 2 * G), 5, 1.0, "normal", dtype)
    k[0, :G, 3] = value  # a constant key group (one channel over G tokens)
    k[1] = value  # every group of this head constant
    c = torch.tensor(value, dtype=dtype)
    k_hat = dequantize_keys(*quantize_keys(k, bits, G), bits, G)
    assert not torch.isnan(k_hat).any()
    assert torch.all(k_hat[0, :G, 3] == c)
    assert torch.all(k_hat[1] == c)
    v = k.clone()
    v[0, 4, G : 2 * G] = value  # a constant value group (G channels of one token)
    v_hat = dequantize_values(*quantize_values(v, bits, G), bits, G)
    assert not torch.isnan(v_hat).any()
    assert torch.all(v_hat[0, 4, G : 2 * G] == c)
    assert torch.all(v_hat[1] == c)


@pytest.mark.parametrize("bits", BITS)
def test_tensor_of_one_value_round_trips_exactly_with_zero_scale(bits):
    x = torch.full((3, 16, 32), -2.5)
    codes, scale, mn = quantize(x, bits, 16, dim=1)
    assert torch.all(scale == 0) and torch.all(mn == -2.5) and torch.all(codes == 0)
    assert torch.equal(dequantize(codes, scale, mn, 16, dim=1), x)


# ---------------------------------------------------------------- shapes and bits that cannot be held


def test_quantize_raises_for_an_axis_not_a_multiple_of_the_group():
    x = random_data((20, 32), 1, 1.0, "normal")
    with pytest.raises(ValueError, match=r"20.*16"):
        quantize(x, 2, 16, dim=0)


def test_quantize_keys_raises_for_a_partial_token_group():
    k = random_data((2, 33, 16), 1, 1.0, "normal")  # one token past a whole group
    with pytest.raises(ValueError, match=r"33.*32"):
        quantize_keys(k, 2, 32)
    with pytest.raises(ValueError, match=r"17.*16"):
        quantize_keys(k[:, :17], 4, 16)


def test_quantize_values_raises_for_a_partial_channel_group_or_token_pair():
    v = random_data((4, 40), 1, 1.0, "normal")
    with pytest.raises(ValueError, match=r"40.*32"):
        quantize_values(v, 2, 32)
    with pytest.raises(ValueError, match=r"token pairs.*3 tokens"):
        quantize_values(random_data((3, 32), 1, 1.0, "normal"), 2, 16)


@pytest.mark.parametrize("bits", BITS)
def test_pack_raises_for_an_axis_not_a_multiple_of_codes_per_word(bits):
    per_word = 32 // bits
    codes = torch.zeros(per_word + 1, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"{per_word + 1}.*{per_word}"):
        pack(codes, bits, dim=0)


@pytest.mark.parametrize("bits", [0, 1, 3, 5, 16, 32])
def test_unsupported_bits_raise_a_clear_value_error(bits):
    x = random_data((32, 32), 1, 1.0, "normal")
    msg = rf"bit width {bits}\b.*2.*4.*8"
    with pytest.raises(ValueError, match=msg):
        quantize(x, bits, 32, dim=0)
    with pytest.raises(ValueError, match=msg):
        quantize_keys(x, bits, 32)
    with pytest.raises(ValueError, match=msg):
        quantize_values(x, bits, 32)
    with pytest.raises(ValueError, match=msg):
        pack(torch.zeros(32, dtype=torch.uint8), bits, dim=0)
    with pytest.raises(ValueError, match=msg):
        unpack(torch.zeros(2, dtype=torch.int32), bits, dim=0)
