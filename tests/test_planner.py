import pytest
import torch

from engine import setup_caches
from kivi_cache import CacheConfig
from model import ModelArgs, build_model
from planner import cache_slot_bytes, max_batch_size, planned_bytes, sequence_bytes, weight_bytes

MODES = [CacheConfig("fp16"), CacheConfig("kivi2"), CacheConfig("kivi4"), CacheConfig("k4v2", 32, 64, 3),
         CacheConfig("k2v4", 32, 32)]


@pytest.fixture(scope="module")
def tiny_model():
    args = ModelArgs(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=256, vocab_size=100, max_seq_len=512)
    return build_model(args, None, torch.device("cpu"), torch.float16)


@pytest.mark.parametrize("cache", MODES, ids=lambda c: f"{c.kv}-R{c.residual_len}-S{c.n_sink}")
@pytest.mark.parametrize("seq_len", [100, 256])
def test_planned_cache_bytes_equal_what_the_caches_allocate(tiny_model, cache, seq_len):
    batch = 3
    setup_caches(tiny_model, cache, batch, seq_len)
    allocated = sum(b.numel() * b.element_size() for layer in tiny_model.layers for b in layer.attention.kv_cache.buffers())
    assert allocated == batch * cache_slot_bytes(tiny_model.args, cache, seq_len, torch.float16)


def test_weight_bytes_equal_the_model_parameters(tiny_model):
    params = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    assert weight_bytes(tiny_model.args, torch.float16) == params


@pytest.mark.parametrize("cache", MODES[:3], ids=lambda c: c.kv)
def test_auto_batch_is_the_largest_that_fits_a_small_budget(cache):
    args = ModelArgs.from_name("llama-2-7b")
    budget = 24 * 10**9
    b = max_batch_size(args, cache, 4096, torch.bfloat16, budget)
    assert b >= 1
    assert planned_bytes(args, cache, 4096, torch.bfloat16, b) <= budget
    assert planned_bytes(args, cache, 4096, torch.bfloat16, b + 1) > budget


def test_kivi2_fits_several_times_the_fp16_batch_at_4k():
    args = ModelArgs.from_name("llama-2-7b")
    budget = 80 * 10**9
    fp16 = max_batch_size(args, CacheConfig("fp16"), 4096, torch.bfloat16, budget)
    kivi2 = max_batch_size(args, CacheConfig("kivi2"), 4096, torch.bfloat16, budget)
    assert kivi2 >= 4.2 * fp16
    assert sequence_bytes(args, CacheConfig("kivi2"), 4096, torch.bfloat16) < sequence_bytes(args, CacheConfig("fp16"), 4096, torch.bfloat16) / 4


def test_nothing_fits_below_the_weights():
    args = ModelArgs.from_name("llama-2-7b")
    assert max_batch_size(args, CacheConfig("kivi2"), 4096, torch.bfloat16, weight_bytes(args, torch.bfloat16)) == 0
