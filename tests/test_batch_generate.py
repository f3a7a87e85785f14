import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint, resolve_checkpoint
from engine import LLM, sample
from kivi_cache import CacheConfig
from model import ModelArgs, build_model
from scripts import batch_generate, make_workload
from scripts.batch_generate import run_batch
from tokenizer import load_tokenizer

KIVI = CacheConfig("kivi2", group_size=32, residual_len=32)  # a short ring: prompts and decode reach the packed store
ROOT = Path(__file__).resolve().parent.parent


class CharTokenizer:
    """Printable ASCII, one token a character."""

    add_bos = False

    def __init__(self, eos_ids: set[int] = frozenset()):
        self.eos_ids = set(eos_ids)

    def encode(self, text: str, bos: bool) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 32) for i in ids)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>", False)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=95,
                     max_seq_len=128)
    return build_model(args, None, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def smollm():
    path = resolve_checkpoint(None)
    args, state_dict = load_checkpoint(path, "cpu", torch.float32)
    return build_model(args, state_dict, torch.device("cpu"), torch.float32), load_tokenizer(path)


def run(model, tokenizer, lines: list, out, batch_size: int = 2, **kwargs) -> dict:
    lines = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    llm = LLM.from_model(model, tokenizer, KIVI, batch_size=batch_size)
    return run_batch(llm, lines, out, "tiny", progress=False, **({"max_new_tokens": 8, "temperature": 0} | kwargs))


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def alone(model, tokenizer, request: dict) -> list[int]:
    """Greedy tokens of one request in a batch of its own."""
    llm = LLM.from_model(model, tokenizer, KIVI, batch_size=1)
    return llm.generate([request], temperature=0)[0].token_ids


def test_greedy_batch_with_refills_matches_each_prompt_alone(smollm, tmp_path):
    model, tokenizer = smollm
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
             "The mitochondria is the powerhouse of the cell. " * 4, "1, 2, 3, 4, 5,"]
    lines = [{"id": i, "prompt_ids": tokenizer.encode(t, bos=tokenizer.add_bos), "max_new_tokens": n}
             for i, (t, n) in enumerate(zip(texts, [18, 5, 9, 12, 6]))]
    llm = LLM.from_model(model, tokenizer, KIVI, batch_size=2)
    llm.sync_every = 4  # more syncs and refills for the same tokens
    run_batch(llm, [json.dumps(line) for line in lines], tmp_path / "out.jsonl", "smollm", progress=False, temperature=0)
    results = {r["id"]: r for r in read(tmp_path / "out.jsonl")}

    for line in lines:
        logits = []

        def recording_step(model, tokens, input_pos, *sampling):
            logits.append(model(tokens, input_pos=input_pos)[0, -1])
            return sample(logits[-1][None], *sampling[:4], input_pos, sampling[4])

        one = LLM.from_model(model, tokenizer, KIVI, batch_size=1)
        one.step = recording_step
        (c,) = one.generate([{"prompt": line["prompt_ids"], "max_new_tokens": line["max_new_tokens"]}], temperature=0)
        r = results[line["id"]]
        diff = next((i for i, (a, b) in enumerate(zip(c.token_ids, r["completion_ids"])) if a != b), None)
        if diff is None:
            assert (r["completion_ids"], r["finish_reason"]) == (c.token_ids, c.finish_reason)
        else:  # the first token comes from the same one-prompt prefill: only decode steps can tie
            assert diff > 0
            top2 = logits[diff - 1].topk(2).values
            assert top2[0] - top2[1] < 1e-4, f"prompt {line['id']} differs at token {diff} without a tie"


def test_static_batches_and_text_prompts_match_each_alone(tiny_model, tmp_path):
    tokenizer = CharTokenizer()
    prompts = ["The capital of France is", "Water boils at", "My favourite colour is", "x"]
    lines = [{"id": p, "prompt": p, "max_new_tokens": n} for p, n in zip(prompts, [6, 20, 4, 9])]
    lines.append({"id": "hot", "prompt": "Water boils at", "max_new_tokens": 20, "temperature": 1.5})
    run(tiny_model, tokenizer, lines, tmp_path / "refill.jsonl")
    run(tiny_model, tokenizer, lines, tmp_path / "static.jsonl", refill=False)
    refill = {r["id"]: r for r in read(tmp_path / "refill.jsonl")}
    static = {r["id"]: r for r in read(tmp_path / "static.jsonl")}
    assert refill["hot"]["completion"] != refill["Water boils at"]["completion"]  # a slot of its own samples
    for line in lines[:-1]:
        assert refill[line["id"]] == static[line["id"]]
        ids = alone(tiny_model, tokenizer, {"prompt": line["prompt"], "max_new_tokens": line["max_new_tokens"]})
        assert refill[line["id"]]["completion"] == tokenizer.decode(ids)


def test_resume_after_a_crash_answers_every_id_once(tiny_model, tmp_path):
    tokenizer = CharTokenizer()
    lines = [{"id": f"p{i}", "prompt": "abcdefghijklmnopqrstuvwxyz"[: 3 + 4 * i], "max_new_tokens": 4 + 3 * i}
             for i in range(6)]
    lines.insert(2, "{not json")
    run(tiny_model, tokenizer, lines, tmp_path / "full.jsonl")
    out = tmp_path / "out.jsonl"
    assert run(tiny_model, tokenizer, lines, out, stop_after=2)["prompts"] == 2
    assert len(read(out)) == 3  # the bad line and two prompts
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"id": "p5", "completion": "cut off by the cra')
    stats = run(tiny_model, tokenizer, lines, out)
    assert (stats["prompts"], stats["errors"]) == (4, 0)
    records = read(out)
    assert sorted(json.dumps(r) for r in records) == sorted(json.dumps(r) for r in read(tmp_path / "full.jsonl"))
    before = out.read_bytes()
    assert run(tiny_model, tokenizer, lines, out)["prompts"] == 0
    assert out.read_bytes() == before


def test_bad_lines_get_one_error_record_each_and_the_run_goes_on(tiny_model, tmp_path):
    lines = ['{"id": "ok", "prompt": "hello"}',
             '{"id": "x", "prompt": ',
             '["a", "list"]',
             '{"prompt": "no id"}',
             '{"id": "no prompt"}',
             '{"id": "number", "prompt": 7}',
             '{"id": "ok", "prompt": "the same id again"}',
             '{"id": "empty", "prompt": "  "}',
             json.dumps({"id": "long", "prompt": "x" * 128}),
             '{"id": "bad max", "prompt": "hi", "max_new_tokens": 0}',
             '{"id": "bad stop", "prompt": "hi", "stop": [""]}',
             '{"id": "odd", "prompt": "hi", "colour": "red"}',
             '{"id": "hot", "prompt": "hi", "temperature": Infinity}',
             "",
             '{"id": 2, "prompt": "bye"}']
    expected = {2: (None, "Expecting"), 3: (None, "JSON object"), 4: (None, "missing id"),
                5: ("no prompt", "exactly one of"), 6: ("number", "must be a string"), 7: ("ok", "duplicate"),
                8: ("empty", "empty"), 9: ("long", "context"), 10: ("bad max", "max_new_tokens"),
                11: ("bad stop", "stop"), 12: ("odd", "unknown field 'colour'"),
                13: ("hot", "temperature")}
    out = tmp_path / "out.jsonl"
    stats = run(tiny_model, CharTokenizer(), lines, out)
    assert (stats["prompts"], stats["errors"]) == (2, len(expected))
    errors = {r["line"]: r for r in read(out) if "error" in r}
    assert errors.keys() == expected.keys()
    for n, (id_, message) in expected.items():
        assert errors[n]["id"] == id_ and message in errors[n]["error"], errors[n]
    assert {r["id"] for r in read(out) if "error" not in r} == {"ok", 2}
    before = out.read_bytes()
    run(tiny_model, CharTokenizer(), lines, out)
    assert out.read_bytes() == before


def test_finish_reasons_length_eos_and_stop_strings(tiny_model, tmp_path):
    prompt = "Stop strings are checked on the host"
    run(tiny_model, CharTokenizer(), [{"id": 0, "prompt": prompt, "max_new_tokens": 24}], tmp_path / "free.jsonl")
    (free,) = read(tmp_path / "free.jsonl")
    text = free["completion"]
    assert (free["finish_reason"], free["completion_tokens"], len(text)) == ("length", 24, 24)

    eos = text[5]
    run(tiny_model, CharTokenizer({ord(eos) - 32}), [{"id": 0, "prompt": prompt, "max_new_tokens": 24}],
        tmp_path / "eos.jsonl")
    (r,) = read(tmp_path / "eos.jsonl")
    end = text.index(eos)
    assert (r["completion"], r["completion_tokens"], r["finish_reason"]) == (text[:end], end + 1, "stop")

    stop = text[15:19]  # tokens 15..18: the host reads tokens 0..16 at the first sync
    lines = [{"id": 0, "prompt": prompt, "max_new_tokens": 24, "stop": ["never there", stop]},
             {"id": 1, "prompt": prompt, "max_new_tokens": 24, "stop": [text[3:5], stop]}]
    run(tiny_model, CharTokenizer(), lines, tmp_path / "stop.jsonl")
    r0, r1 = sorted(read(tmp_path / "stop.jsonl"), key=lambda r: r["id"])
    end = text.index(stop)
    assert (r0["completion"], r0["completion_tokens"], r0["finish_reason"]) == (text[:end], end + len(stop), "stop")
    end = text.index(text[3:5])
    assert (r1["completion"], r1["completion_tokens"], r1["finish_reason"]) == (text[:end], end + 2, "stop")


def test_cli_with_random_weights_reads_prompt_ids(tmp_path, capsys):
    make_workload.main([str(tmp_path / "in.jsonl"), "--token-ids", "--vocab-size", "49152", "--n", "3",
                        "--min-len", "5", "--max-len", "40", "--min-new", "2", "--max-new", "5"])
    batch_generate.main([str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--random-weights",
                         "--checkpoint", "smollm2-135m", "--batch-size", "auto", "--device", "cpu"])
    workload = read(tmp_path / "in.jsonl")
    records = {r["id"]: r for r in read(tmp_path / "out.jsonl")}
    for line in workload:
        r = records[line["id"]]
        assert len(r["completion_ids"]) == r["completion_tokens"] == line["max_new_tokens"]
        assert r["prompt_tokens"] == len(line["prompt_ids"]) and 5 <= r["prompt_tokens"] <= 40
    summary = capsys.readouterr().err
    assert "3 requests" in summary and "batch size 3" in summary


def test_workload_text_prompts_have_token_lengths_in_range(smollm, tmp_path):
    _, tokenizer = smollm
    make_workload.main([str(tmp_path / "w.jsonl"), "--n", "8", "--min-len", "20", "--max-len", "60", "--seed", "3"])
    lines = read(tmp_path / "w.jsonl")
    assert all(20 <= len(tokenizer.encode(r["prompt"], bos=tokenizer.add_bos)) <= 60 for r in lines)
    assert all(50 <= r["max_new_tokens"] <= 500 for r in lines)
    make_workload.main([str(tmp_path / "again.jsonl"), "--n", "8", "--min-len", "20", "--max-len", "60", "--seed", "3"])
    assert read(tmp_path / "again.jsonl") == lines


def test_openai_batch_lines_come_back_in_openai_shape(tiny_model, tmp_path):
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    lines = [{"custom_id": "c1", "method": "POST", "url": "/v1/completions", "body": body | {"prompt": "Water boils at"}},
             {"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions",
              "body": body | {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True}},
             {"custom_id": "c3", "method": "POST", "url": "/v1/completions",
              "body": body | {"prompt": "abc", "n": 3, "temperature": 1.0, "seed": 1}},
             {"custom_id": "bad", "method": "POST", "url": "/v1/completions", "body": body | {"prompt": "a", "best_of": 2}},
             {"id": "ours", "prompt": "Water boils at", "max_new_tokens": 6, "logprobs": True}]
    run(tiny_model, CharTokenizer(), lines, tmp_path / "out.jsonl")
    records = {r.get("custom_id", r.get("id")): r for r in read(tmp_path / "out.jsonl")}
    ours = records["ours"]
    c1 = records["c1"]["response"]["body"]
    assert records["c1"]["error"] is None and records["c1"]["response"]["status_code"] == 200
    assert c1["object"] == "text_completion" and c1["model"] == "tiny"
    assert c1["choices"] == [{"index": 0, "text": ours["completion"], "finish_reason": "length", "logprobs": None}]
    assert c1["usage"] == {"prompt_tokens": 14, "completion_tokens": 6, "total_tokens": 20}
    c2 = records["c2"]["response"]["body"]
    assert c2["object"] == "chat.completion" and c2["choices"][0]["message"]["role"] == "assistant"
    content = c2["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == c2["choices"][0]["message"]["content"]
    assert len(content) == 6 and all(t["logprob"] <= 0 for t in content)
    assert c2["usage"]["prompt_tokens"] == len(CharTokenizer().encode_chat([{"role": "user", "content": "Hi"}]))
    c3 = records["c3"]["response"]["body"]
    assert [c["index"] for c in c3["choices"]] == [0, 1, 2] and c3["usage"]["completion_tokens"] == 18
    assert len({c["text"] for c in c3["choices"]}) == 3
    assert records["bad"]["response"] is None and "best_of" in records["bad"]["error"]["message"]
    assert len(ours["logprobs"]) == 6


def run_command(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """batch_generate.py on a tiny random model (a shape folder in tmp_path)."""
    (tmp_path / "shape").mkdir(exist_ok=True)
    ModelArgs(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=64, vocab_size=64,
              max_seq_len=128).save(tmp_path / "shape" / "config.json")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "batch_generate.py"), *args, "--random-weights",
                           "--checkpoint", str(tmp_path / "shape"), "--device", "cpu", "--batch-size", "2"],
                          capture_output=True, text=True, timeout=300)


def test_a_second_run_on_an_output_being_written_is_refused_and_ids_stay_unique(tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt_ids": [1 + i, 2, 3]}) + "\n" for i in range(5)))
    out = tmp_path / "out.jsonl"
    holder = batch_generate.lock_output(out)  # this process plays the run in progress
    r = run_command(tmp_path, str(tmp_path / "in.jsonl"), str(out))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {out} is being written by another run (pid {os.getpid()}): wait for it to end, or write elsewhere"]
    assert not out.exists()
    holder.close()
    for _ in range(2):  # the run, then a re-run that finds everything answered
        assert run_command(tmp_path, str(tmp_path / "in.jsonl"), str(out)).returncode == 0
    assert sorted(r["id"] for r in read(out)) == list(range(5))


def test_output_that_is_the_input_is_refused(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt_ids": [1, 2]}\n')
    r = run_command(tmp_path, str(tmp_path / "in.jsonl"), str(tmp_path / "in.jsonl"))
    assert r.returncode == 1 and "is the input" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "in.jsonl").read_text() == '{"id": 1, "prompt_ids": [1, 2]}\n'


@pytest.mark.parametrize("bad_line", ["{not json", '{"completion": "no id"}'])
def test_a_bad_line_in_the_output_is_named_with_its_file_and_line(tmp_path, bad_line):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt_ids": [1, 2]}\n')
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 7, "completion_ids": [1], "prompt_tokens": 2, "completion_tokens": 1, "finish_reason": '
                   f'"length"}}\n{bad_line}\n{{"id": 8, "error": "x", "line": 3}}\n')
    r = run_command(tmp_path, str(tmp_path / "in.jsonl"), str(out))
    assert r.returncode == 1 and f"{out} line 2" in r.stderr and len(r.stderr.strip().splitlines()) == 1
