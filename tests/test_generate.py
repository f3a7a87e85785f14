import pytest
import torch

from generate import CacheConfig, Sampling, generate, sample
from model import ModelArgs, build_model


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=97, max_seq_len=256)
    return build_model(args, None, torch.device("cpu"), torch.float32)


def full_forward_argmax(model, tokens: list[int]) -> list[int]:
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0].argmax(-1).tolist()


@pytest.mark.parametrize("lengths", [[7], [3, 19, 11]])
def test_greedy_static_cache_equals_full_forward_argmax(tiny_model, lengths):
    gen = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lengths]
    outputs, _ = generate(tiny_model, prompts, 24, Sampling(), CacheConfig("fp16"))
    for prompt, new in zip(prompts, outputs):
        assert len(new) == 24
        expected = full_forward_argmax(tiny_model, prompt + new)[len(prompt) - 1 : -1]
        assert new == expected


def test_generation_stops_at_eos(tiny_model):
    prompt = [5, 6, 7]
    free, _ = generate(tiny_model, [prompt], 40, Sampling(), CacheConfig("fp16"))
    eos = free[0][4]
    stopped, _ = generate(tiny_model, [prompt, [9, 9]], 40, Sampling(), CacheConfig("fp16"), eos_ids={eos})
    assert stopped[0] == free[0][: free[0].index(eos) + 1]


def test_sample_greedy_and_degenerate_filters_pick_the_argmax():
    logits = torch.randn(5, 50)
    best = logits.argmax(-1)
    assert torch.equal(sample(logits, Sampling()), best)
    assert torch.equal(sample(logits, Sampling(temperature=1.0, top_k=1)), best)
    assert torch.equal(sample(logits, Sampling(temperature=1.0, top_p=1e-6)), best)


def test_sample_stays_in_top_k_and_is_seeded():
    logits = torch.randn(4, 50)
    allowed = torch.topk(logits, 3, dim=-1).indices
    torch.manual_seed(1)
    first = torch.stack([sample(logits, Sampling(temperature=2.0, top_k=3)) for _ in range(50)], 1)
    assert (first[..., None] == allowed[:, None]).any(-1).all()
    assert len(set(first.flatten().tolist())) > 4  # it does sample, not always the argmax
    torch.manual_seed(1)
    again = torch.stack([sample(logits, Sampling(temperature=2.0, top_k=3)) for _ in range(50)], 1)
    assert torch.equal(first, again)


def test_sample_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    seen = {int(sample(logits, Sampling(temperature=1.0, top_p=0.7))) for _ in range(200)}
    assert seen == {0, 1}


@pytest.mark.parametrize("bad", [Sampling(temperature=-1), Sampling(top_k=-2), Sampling(top_p=0), Sampling(top_p=1.5)])
def test_invalid_sampling_values_are_rejected(bad):
    with pytest.raises(ValueError):
        bad.check()
