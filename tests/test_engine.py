"""engine.py: the scheduler against a full forward, the device sampler, per-request seeds,
choices, logprobs, stop strings and bad requests."""

import math

import pytest
import torch

from engine import LLM, SamplingParams, filter_mode, prefill, sample, setup_caches, uniform_noise
from kivi_cache import CacheConfig
from model import ModelArgs, build_model


class CharTokenizer:
    """Printable ASCII, one token a character."""

    add_bos = False
    eos_ids: set[int] = set()

    def encode(self, text: str, bos: bool) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 32) for i in ids)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=95, max_seq_len=256)
    return build_model(args, None, torch.device("cpu"), torch.float32)


def llm_of(model, cache=CacheConfig("fp16"), **kwargs) -> LLM:
    return LLM.from_model(model, CharTokenizer(), cache, **kwargs)


def full_forward(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0]


@pytest.mark.parametrize("lengths", [[7], [3, 19, 11]])
def test_greedy_equals_full_forward_argmax_and_logprobs_are_the_models(tiny_model, lengths):
    gen = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(0, 95, (n,), generator=gen).tolist() for n in lengths]
    out = llm_of(tiny_model).generate([{"prompt": p} for p in prompts], max_new_tokens=24, temperature=0, logprobs=True)
    for prompt, c in zip(prompts, out):
        assert (len(c.token_ids), c.finish_reason, c.prompt_tokens) == (24, "length", len(prompt))
        logits = full_forward(tiny_model, prompt + c.token_ids)[len(prompt) - 1 : -1]
        assert c.token_ids == logits.argmax(-1).tolist()
        want = logits.log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv", ["fp16", "kivi2"])
def test_packed_prefill_equals_one_prompt_a_forward(tiny_model, kv, monkeypatch):
    """Prompts of different lengths in one forward (and split over forwards at PREFILL_TOKENS)
    fill each slot's cache and give each prompt's last logits as prefilling it alone does."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 95, (n,), generator=gen).tolist() for n in (1, 40, 130, 77, 200)]
    slots = [3, 0, 4, 1, 2]
    cache = CacheConfig(kv, group_size=16, residual_len=32)
    monkeypatch.setattr("engine.PREFILL_TOKENS", 256)  # two forwards: 1 + 40 + 130 + 77, then 200
    setup_caches(tiny_model, cache, 5, 210)
    buffers = [b for layer in tiny_model.layers for b in layer.attention.kv_cache.buffers()]
    results = []
    for groups in ([prompts], [[p] for p in prompts]):
        for b in buffers:
            b.zero_()  # fresh caches
        with torch.inference_mode():
            logits = torch.cat([prefill(tiny_model, group, slots[i : i + len(group)])
                                for i, group in zip(range(0, 5, len(groups[0])), groups)])
        results.append((logits, [b.clone() for b in buffers]))
    (packed, packed_buffers), (alone, alone_buffers) = results
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    for a, b in zip(packed_buffers, alone_buffers):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generation_stops_at_eos(tiny_model):
    prompt = {"prompt": [5, 6, 7]}
    (free,) = llm_of(tiny_model).generate([prompt], max_new_tokens=40, temperature=0)
    eos = free.token_ids[4]
    llm = LLM.from_model(tiny_model, CharTokenizer(), CacheConfig("fp16"), generation_config={"eos_token_id": [eos]})
    stopped, other = llm.generate([prompt, {"prompt": [9, 9]}], max_new_tokens=40, temperature=0)
    end = free.token_ids.index(eos)
    assert (stopped.token_ids, stopped.completion_tokens, stopped.finish_reason) == (free.token_ids[:end], end + 1, "stop")


def test_stop_strings_cut_the_text(tiny_model):
    llm = llm_of(tiny_model)
    (free,) = llm.generate(["Stop strings are checked on the host"], max_new_tokens=24, temperature=0)
    stop = free.text[9:12]
    (c,) = llm.generate(["Stop strings are checked on the host"], max_new_tokens=24, temperature=0,
                        stop=["never there", stop])
    end = free.text.index(stop)
    assert (c.text, c.completion_tokens, c.finish_reason) == (free.text[:end], end + len(stop), "stop")


def test_sample_greedy_rows_and_degenerate_filters_pick_the_argmax():
    logits = torch.randn(5, 50)
    best = logits.argmax(-1)
    zeros, ones, seed, pos = torch.zeros(5), torch.ones(5), torch.arange(5), torch.arange(5) + 3
    k0 = torch.zeros(5, dtype=torch.long)
    assert torch.equal(sample(logits, zeros, k0, ones, seed, pos, "none")[0], best)
    assert torch.equal(sample(logits, zeros, k0, ones, seed, pos, "greedy")[0], best)
    assert torch.equal(sample(logits, ones * 3, k0 + 1, ones, seed, pos, "top_k")[0], best)
    assert torch.equal(sample(logits, ones * 3, k0, ones * 1e-6, seed, pos, "sort")[0], best)
    tokens, logprobs = sample(logits, ones, k0, ones, seed, pos, "none")
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0])


def test_sample_stays_in_top_k_and_top_p_and_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    ones, seed, pos = torch.ones(4000), torch.arange(4000), torch.zeros(4000, dtype=torch.long)
    k = torch.full((4000,), 2)
    for mode, top_k, top_p, allowed in (("top_k", k, ones, {0, 1}), ("sort", k * 0, ones * 0.7, {0, 1}),
                                        ("none", k * 0, ones, {0, 1, 2, 3})):
        tokens = sample(logits, ones, top_k, top_p, seed, pos, mode)[0]
        assert set(tokens.tolist()) == allowed
    share = (sample(logits, ones, k * 0, ones, seed, pos, "none")[0] == 0).float().mean().item()
    assert abs(share - 0.5) < 0.03


def test_noise_is_a_function_of_seed_position_and_token_only():
    u = uniform_noise(torch.tensor([1, 1, 2, 2**62 + 5]), torch.tensor([7, 8, 7, 7]), 1000)
    assert ((u > 0) & (u < 1)).all()
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    alone = uniform_noise(torch.tensor([2**62 + 5]), torch.tensor([7]), 1000)
    assert torch.equal(u[3], alone[0])
    assert abs(u.mean().item() - 0.5) < 0.02


def test_a_seeded_request_is_the_same_alone_and_in_any_batch_and_slot(tiny_model):
    seeded = {"prompt": "The same text, whoever its batch-mates", "seed": 42, "temperature": 1.0, "top_k": 20}
    others = [{"prompt": "x" * (i + 1), "max_new_tokens": 3 + 5 * i, "temperature": 0.7} for i in range(8)]
    (alone,) = llm_of(tiny_model, batch_size=1).generate([seeded], max_new_tokens=30)
    for batch_size, order in ((9, others + [seeded]), (3, others[:5] + [seeded] + others[5:])):
        out = llm_of(tiny_model, batch_size=batch_size).generate(order, max_new_tokens=30)
        assert out[order.index(seeded)].token_ids == alone.token_ids
    hot = llm_of(tiny_model).generate([seeded | {"seed": 43}], max_new_tokens=30)[0]
    assert hot.token_ids != alone.token_ids


def test_n_choices_differ_and_come_in_order(tiny_model):
    out = llm_of(tiny_model).generate(["abc", "de"], max_new_tokens=12, temperature=1.0, n=3, seed=5)
    assert [(c.request, c.choice) for c in out] == [(r, i) for r in range(2) for i in range(3)]
    assert len({tuple(c.token_ids) for c in out[:3]}) == 3


def test_filter_mode_is_the_cheapest_that_serves_every_row():
    p = SamplingParams()
    assert filter_mode([p.update({"temperature": 0, "top_p": 0.5})]) == "greedy"
    assert filter_mode([p.update({"top_k": 0}), p.update({"temperature": 0})]) == "none"
    assert filter_mode([p, p.update({"top_k": 0})]) == "top_k"
    assert filter_mode([p, p.update({"top_p": 0.9})]) == filter_mode([p.update({"top_k": 1000})]) == "sort"


@pytest.mark.parametrize("fields, message", [
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
    ({"seed": 2**63}, "seed"), ({"seed": -1}, "seed"), ({"n": 0}, "n"), ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"), ({"logprobs": 1}, "logprobs"), ({"best_of": 2}, "unknown sampling field 'best_of'"),
])
def test_bad_sampling_values_are_one_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams().update(fields)


@pytest.mark.parametrize("request_, message", [
    ("   ", "empty prompt"), ({"prompt": []}, "token ids"), ({"prompt": [95]}, "token ids"),
    ({"prompt": "a", "messages": []}, "exactly one"), ({"prompt": "a", "colour": 1}, "unknown sampling field"),
    ({"prompt": "a" * 250}, "exceeds the model's context of 256"), (7, "a request is"),
    ({"messages": [1, 2]}, "messages must be"), ({"prompt": [{"role": "user", "content": "x"}]}, "token ids"),
    ([3, 4], "a request is"),
])
def test_bad_requests_name_the_request(tiny_model, request_, message):
    with pytest.raises(ValueError, match=rf"request 1: .*{message}"):
        llm_of(tiny_model).generate(["fine", request_], max_new_tokens=8)


@pytest.mark.parametrize("kv", ["fp16", "kivi2"])
def test_chat_keeps_the_cache_between_turns(kv, monkeypatch):
    """Turn 2 feeds only the tokens past the cached history (no prefill) and replies what a
    fresh prefill of the whole conversation replies. (The conversation stays inside kivi2's
    full-precision ring: past it, decode-time keys and values differ from a prefill's by
    design, since decode attends over the quantized store.)"""
    import engine

    llm = LLM(kv=kv, device="cpu")
    chat = engine.Chat(llm, context=512)
    first = chat.send("Name a fruit.", max_new_tokens=12, temperature=0)
    real, prefills = engine.prefill, []
    monkeypatch.setattr(engine, "prefill", lambda *args: prefills.append(args) or real(*args))
    second = chat.send("And a vegetable?", max_new_tokens=12, temperature=0)
    assert prefills == []
    monkeypatch.undo()
    conversation = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": first.text},
                    {"role": "user", "content": "And a vegetable?"}]
    (fresh,) = llm.generate([conversation], max_new_tokens=12, temperature=0)
    assert second.token_ids == fresh.token_ids and second.prompt_tokens == fresh.prompt_tokens
    third = chat.send("And a drink?", max_new_tokens=6, temperature=0)  # after llm.generate rebuilt the caches
    (again,) = llm.generate([chat.messages[:-1]], max_new_tokens=6, temperature=0)
    assert third.token_ids == again.token_ids


def test_chat_turns_feed_exactly_the_cached_tokens_and_two_chats_do_not_mix():
    """No step runs past a reply (a KIVI ring overrun would overwrite positions the next turn
    reads), and a chat whose slot another chat used starts over."""
    import engine

    llm = LLM(kv="kivi2", device="cpu", residual_length=32)
    fed = []
    step = llm.step
    llm.step = lambda model, tokens, input_pos, *rest: fed.append(int(input_pos[0])) or step(model, tokens, input_pos, *rest)
    a = engine.Chat(llm, context=512)
    for text in ("Name a fruit.", "And a vegetable?"):
        fed.clear()
        a.send(text, max_new_tokens=20, temperature=0)
        assert max(fed) == len(a.cached) - 1
    llm = LLM(kv="fp16", device="cpu")  # fp16: a fresh prefill equals the resumed turn
    a, b, alone = (engine.Chat(llm, context=512) for _ in range(3))
    a.send("Name a fruit.", max_new_tokens=8, temperature=0)
    for chat in (alone, b):
        chat.send("Name a city.", max_new_tokens=8, temperature=0)
    b_turn = b.send("And a river?", max_new_tokens=8, temperature=0)
    a.send("And a drink?", max_new_tokens=8, temperature=0)  # a's slot history is gone: it starts over
    assert b_turn.token_ids == alone.send("And a river?", max_new_tokens=8, temperature=0).token_ids


def test_random_weights_leave_the_callers_seed_alone(tmp_path):
    from engine import load_model

    ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=32, vocab_size=40,
              max_seq_len=64).save(tmp_path / "config.json")
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    load_model(str(tmp_path), torch.device("cpu"), torch.float32, random_weights=True)
    assert torch.equal(torch.rand(3), want)
