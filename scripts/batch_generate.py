"""Answer a JSONL file of requests with continuous batching (engine.LLM), in our line format
or in OpenAI's batch format, line by line.

    python scripts/batch_generate.py INPUT.jsonl OUTPUT.jsonl [--kv kivi2] [--batch-size N|auto]

Our lines: {"id", one of "prompt" (text), "prompt_ids" (token ids) or "messages" (chat), and
optionally the sampling fields of engine.SamplingParams: max_new_tokens, temperature, top_k,
top_p, seed, stop, n, logprobs}. Answer: {"id", "completion" (or "completion_ids" for a
prompt_ids line), "prompt_tokens", "completion_tokens", "finish_reason" ("stop" or
"length"), "logprobs" when asked}; with n > 1 the choices go in "choices" [{"completion",
"completion_tokens", "finish_reason", ...}] and completion_tokens is their sum.
OpenAI lines: {"custom_id", "method": "POST", "url": "/v1/completions" or
"/v1/chat/completions", "body": {"model", "prompt" or "messages", "max_tokens", "temperature",
"top_p", "seed", "stop", "n", "logprobs"}}, answered with OpenAI's batch output lines.
A line that cannot run (bad JSON, a field neither format knows, a bad value, too long for the
context) gets an error record and the run goes on.

Each record is appended and flushed as its request ends (and fsynced within FSYNC_EVERY_S
seconds). A re-run with the same OUTPUT skips the requests and the error lines already there,
so a killed run resumes where it stopped; OUTPUT.lock keeps a second run off the same OUTPUT.
Under `torchrun --nproc-per-node N` the model runs tensor parallel (tp.py): every rank runs
the same requests, rank 0 alone writes, locks and shows progress.
"""

import argparse
import fcntl
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from tqdm import tqdm

from engine import LLM, Completion, SamplingParams
import tp
from generate import add_runtime_args, add_sampling_args, parse_batch_size, run_cli, runtime, sampling_from

FSYNC_EVERY_S = 5.0
SAMPLING = set(SamplingParams.__dataclass_fields__)
OPENAI_URLS = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}


class Line:
    """One input line made ready: its key, whether OpenAI's, the engine request."""

    def __init__(self, number: int, r: object):
        if not isinstance(r, dict):
            raise ValueError("not a JSON object")
        self.number, self.chat, self.ids = number, False, False
        self.openai, self.key = _format_and_key(r)
        self.request = self._openai(r) if self.openai else self._ours(r)

    def _ours(self, r: dict) -> dict:
        if unknown := sorted(set(r) - {"id", "prompt", "prompt_ids", "messages"} - SAMPLING):
            raise ValueError(f"unknown field {unknown[0]!r}")
        _check_key(self.key, "id")
        given = [k for k in ("prompt", "prompt_ids", "messages") if k in r]
        if len(given) != 1:
            raise ValueError("a line needs exactly one of prompt, prompt_ids and messages")
        self.ids = given[0] == "prompt_ids"
        if given[0] == "prompt" and not isinstance(r["prompt"], str):
            raise ValueError("prompt must be a string (token ids go in prompt_ids)")
        if self.ids and not (isinstance(r["prompt_ids"], list) and r["prompt_ids"]):
            raise ValueError("prompt_ids must be a non-empty list of token ids")
        if given[0] == "messages" and not isinstance(r["messages"], list):
            raise ValueError("messages must be a list of chat messages")
        request = {k: v for k, v in r.items() if k in SAMPLING}
        request["messages" if given[0] == "messages" else "prompt"] = r[given[0]]
        return request

    def _openai(self, r: dict) -> dict:
        if unknown := sorted(set(r) - {"custom_id", "method", "url", "body"}):
            raise ValueError(f"unknown field {unknown[0]!r}")
        _check_key(self.key, "custom_id")
        if r.get("method", "POST") != "POST" or r.get("url") not in OPENAI_URLS:
            raise ValueError(f"method must be POST and url one of {', '.join(OPENAI_URLS)}")
        body = r.get("body")
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        self.chat = r["url"] == "/v1/chat/completions"
        prompt_key = OPENAI_URLS[r["url"]]
        known = {"model", prompt_key, "max_tokens", "temperature", "top_p", "seed", "stop", "n", "logprobs"}
        known |= {"max_completion_tokens", "top_logprobs"} if self.chat else set()
        if unknown := sorted(set(body) - known):
            raise ValueError(f"unknown body field {unknown[0]!r}")
        if prompt_key not in body:
            raise ValueError(f"body needs {prompt_key!r}")
        if not self.chat and not isinstance(body["prompt"], str):
            raise ValueError("body.prompt must be a string")
        if body.get("top_logprobs") or (not self.chat and body.get("logprobs") not in (None, 0)):
            raise ValueError("top logprobs (alternatives to each token) are not supported: only the tokens' own")
        request = {prompt_key: body[prompt_key]}
        request |= {k: body[k] for k in ("temperature", "top_p", "seed", "stop", "n") if body.get(k) is not None}
        max_tokens = body.get("max_completion_tokens")
        if (max_tokens := body.get("max_tokens") if max_tokens is None else max_tokens) is not None:
            request["max_new_tokens"] = max_tokens
        if body.get("logprobs") is not None:
            request["logprobs"] = True if not self.chat else body["logprobs"]
        return request


def _format_and_key(r: object) -> tuple[bool, object]:
    """(whether an OpenAI line, its custom_id or id) of a parsed line."""
    openai = isinstance(r, dict) and "custom_id" in r
    return openai, r.get("custom_id" if openai else "id") if isinstance(r, dict) else None


def _check_key(key, name: str) -> None:
    if key is None:
        raise ValueError(f"missing {name}")
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise ValueError(f"{name} must be a string or an integer")


def error_record(r: object, number: int, message: str) -> dict:
    """The record of line `number` (parsed as r, None if not JSON) that cannot run."""
    openai, key = _format_and_key(r)
    if openai:
        return {"id": f"batch_req_{number}", "custom_id": key, "response": None,
                "error": {"code": "invalid_request", "message": message, "line": number}}
    return {"id": key, "error": message, "line": number}


def answer(line: Line, completions: list[Completion], model_name: str, tokenizer) -> dict:
    """The output record of a line whose completions have all ended."""
    completions = sorted(completions, key=lambda c: c.choice)
    prompt_tokens = completions[0].prompt_tokens
    used = sum(c.completion_tokens for c in completions)
    if line.openai:
        return {"id": f"batch_req_{line.number}", "custom_id": line.key, "error": None,
                "response": {"status_code": 200, "request_id": f"req_{line.number}",
                             "body": _openai_body(line, completions, model_name, tokenizer, prompt_tokens, used)}}
    choices = []
    for c in completions:
        choice = {"completion_ids": c.token_ids} if line.ids else {"completion": c.text}
        choice |= {"completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason}
        choices.append(choice | ({"logprobs": c.logprobs} if c.logprobs is not None else {}))
    if len(choices) == 1:
        return {"id": line.key, "prompt_tokens": prompt_tokens, **choices[0]}
    return {"id": line.key, "choices": choices, "prompt_tokens": prompt_tokens, "completion_tokens": used}


def _openai_body(line: Line, completions: list[Completion], model_name: str, tokenizer, prompt_tokens: int,
                 used: int) -> dict:
    choices = []
    for c in completions:
        logprobs = None
        if c.logprobs is not None:
            pieces = [tokenizer.decode([t]) for t in c.token_ids]
            logprobs = ({"content": [{"token": s, "logprob": x, "bytes": list(s.encode()), "top_logprobs": []}
                                     for s, x in zip(pieces, c.logprobs)]} if line.chat
                        else {"tokens": pieces, "token_logprobs": c.logprobs, "top_logprobs": None})
        text = {"message": {"role": "assistant", "content": c.text}} if line.chat else {"text": c.text}
        choices.append({"index": c.choice, **text, "finish_reason": c.finish_reason, "logprobs": logprobs})
    return {"id": f"{'chatcmpl' if line.chat else 'cmpl'}-{line.number}",
            "object": "chat.completion" if line.chat else "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}}


def read_done(path: Path) -> tuple[set, set[int]]:
    """(keys answered, line numbers answered with an error) in an earlier run's output. First
    drops a partial last line, left by a run killed while writing it."""
    if not path.exists():
        return set(), set()
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        os.truncate(path, len(data))
    keys, lines = set(), set()
    # split on b"\n" only: str.splitlines would also split at a U+2028 inside a completion
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            r = json.loads(raw)
            if "custom_id" in r:
                (lines.add(r["error"]["line"]) if r["error"] else keys.add(r["custom_id"]))
            else:
                (lines.add(r["line"]) if "error" in r else keys.add(r["id"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n} is not an output record of this command ({e!r}): "
                             "fix or remove it, then run again") from None
    return keys, lines


def write_record(f: TextIO, record: dict) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")  # one write of a whole line
    f.flush()


def _fsync(f: TextIO) -> None:
    if tp.rank() == 0:  # the other ranks write to os.devnull, which has no fsync
        os.fsync(f.fileno())


def lock_output(out_path: Path) -> TextIO:
    """Hold OUTPUT.lock for this process (released when it exits), or fail naming the holder."""
    lock = open(out_path.with_name(out_path.name + ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise ValueError(f"{out_path} is being written by another run ({lock.read().strip() or 'pid unknown'}): "
                         "wait for it to end, or write elsewhere") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    return lock


def run_batch(llm: LLM, lines: list[str], out_path: Path, model_name: str, refill: bool = True,
              stop_after: int | None = None, progress: bool = True, **sampling) -> dict:
    """Answer every input line not yet answered in out_path, appending each record as its
    request ends; returns the run's stats. sampling: defaults for the lines' own fields.
    stop_after: return once that many requests have ended (tests use it as a crash)."""
    t0 = time.perf_counter()
    # under torchrun every rank runs the same jobs, rank 0 alone reads and writes the output
    done = [read_done(out_path) if tp.rank() == 0 else None]
    if tp.world_size() > 1:
        dist.broadcast_object_list(done, src=0)
    done_keys, done_lines = done[0]
    ready, choices, errors, seen, jobs = {}, {}, [], set(), []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        r = None
        try:
            r = json.loads(raw)  # json.JSONDecodeError is a ValueError
            line = Line(n, r)
            if line.key in seen:
                raise ValueError(f"duplicate id {line.key!r}")
            seen.add(line.key)
            line_jobs = llm.jobs([line.request], **sampling)
        except ValueError as e:
            if n not in done_lines:
                errors.append(error_record(r, n, str(e).removeprefix("request 0: ")))
            continue
        if line.key in done_keys:
            continue
        for job in line_jobs:
            job.request = n
        ready[n], choices[n] = line, len(line_jobs)
        jobs += line_jobs
    stats = {"prompts": 0, "errors": len(errors), "tokens": 0}
    bar = tqdm(total=len(ready), unit="request", disable=not progress or tp.rank() > 0)
    ended = defaultdict(list)
    with open(out_path if tp.rank() == 0 else os.devnull, "a", encoding="utf-8") as out, bar:
        for record in errors:
            write_record(out, record)
        synced = t_run = time.perf_counter()
        for c in llm.run(jobs, refill=refill):
            done = ended[c.request]
            done.append(c)
            if len(done) < choices[c.request]:
                continue
            del ended[c.request]
            write_record(out, answer(ready[c.request], done, model_name, llm.tokenizer))
            if time.perf_counter() - synced > FSYNC_EVERY_S:  # flushed lines survive a crash of this process;
                # fsync (against a crash of the machine) blocks the host, and so the GPU, for a disk write
                _fsync(out)
                synced = time.perf_counter()
            stats["prompts"] += 1
            stats["tokens"] += sum(x.completion_tokens for x in done)
            bar.update()
            bar.set_postfix_str(f"{stats['tokens'] / (time.perf_counter() - t_run):.1f} tokens/s")
            if stats["prompts"] == stop_after:
                break
        _fsync(out)
    stats |= llm.stats
    stats["seconds"] = time.perf_counter() - t0 - stats.get("warmup_s", 0.0)
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="JSONL requests")
    p.add_argument("output", type=Path, help="JSONL results, appended to (a re-run resumes)")
    p.add_argument("--checkpoint", help="a name under checkpoints/ or a path; with --random-weights a model shape")
    p.add_argument("--random-weights", action="store_true", help="random weights, no tokenizer: lines give prompt_ids")
    p.add_argument("--kv", default="kivi2", help="cache mode: fp16, kivi2, kivi4, k{2,4}v{2,4}")
    p.add_argument("--batch-size", type=parse_batch_size, default="auto", help="cache slots, or auto")
    p.add_argument("--no-refill", action="store_true", help="static batches: the next B prompts start when all B end")
    add_sampling_args(p)  # defaults for lines that do not set their own
    add_runtime_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from checkpoint import DEFAULT_CHECKPOINT

    args = parse_args(argv)
    if tp.rank() > 0:  # under torchrun rank 0 alone prints (every rank computes the same tokens)
        sys.stdout = sys.stderr = open(os.devnull, "w")
    runtime(args, args.kv)
    sampling = sampling_from(args)
    if not args.input.is_file():
        raise ValueError(f"no input file {args.input}")
    if args.output.exists() and args.output.resolve() == args.input.resolve():
        raise ValueError(f"the output {args.output} is the input: results are appended to the output, pick another file")
    lock = lock_output(args.output) if tp.rank() == 0 else None
    with open(args.input, encoding="utf-8") as f:
        lines = f.readlines()
    llm = LLM(args.checkpoint, kv=args.kv, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
              compile=args.compile, group_size=args.group_size, residual_length=args.residual_length,
              sink_tokens=args.sink_tokens, random_weights=args.random_weights)
    if llm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(llm.device)
    stats = run_batch(llm, lines, args.output, args.checkpoint or DEFAULT_CHECKPOINT, refill=not args.no_refill,
                      **sampling)
    if lock is not None:
        lock.close()
    peak = "n/a on CPU"
    if llm.device.type == "cuda":
        retries = torch.cuda.memory_stats(llm.device)["num_alloc_retries"]
        peak = f"{torch.cuda.max_memory_allocated(llm.device) / 1e9:.2f} GB ({retries} allocator retries)"
    prefill, decode = stats.get("prefill_s", 0.0), stats.get("decode_s", 0.0)
    print(f"{stats['prompts']} requests (bad lines: {stats['errors']}), {stats['tokens']} tokens in "
          f"{stats['seconds']:.1f} s (prefill {prefill:.1f} s, decode {decode:.1f} s, "
          f"host {stats['seconds'] - prefill - decode:.1f} s): {stats['tokens'] / max(stats['seconds'], 1e-9):.1f} tokens/s; "
          f"batch size {stats.get('batch_size', 0)}, {args.kv} cache; peak memory {peak}; "
          f"compilation and warm-up {stats.get('warmup_s', 0.0):.1f} s before that", file=sys.stderr)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
