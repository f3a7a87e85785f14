"""Generate completions for a JSONL file of prompts, with continuous batching in the static cache.

    python scripts/batch_generate.py INPUT.jsonl OUTPUT.jsonl [--kv kivi2] [--batch-size N|auto]

Input lines: {"id", "prompt"} (or "prompt_ids", a list of token ids), optionally
"max_new_tokens", "temperature" and "stop" (a list of strings). Output lines: {"id",
"completion" (or "completion_ids"), "prompt_tokens", "completion_tokens", "finish_reason":
eos, length or stop}, or {"id", "error", "line"} for a line that cannot run.

The cache holds B slots. When a sequence ends, the next prompt is prefilled into its slot
while the other slots keep decoding: the decode step always runs on all B slots (one CUDA
graph), with a temperature per slot held in a device tensor. The host reads the tokens every
SYNC_EVERY steps, so a slot may run a few steps past its end; those tokens are dropped.
Each record is appended and flushed as its prompt ends (and fsynced within FSYNC_EVERY_S
seconds). A re-run with the same OUTPUT skips the ids and the error lines already there, so
a killed run resumes where it stopped.
"""

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor
from tqdm import tqdm

from generate import (Sampling, add_runtime_args, add_sampling_args, compiled_if_asked, parse_batch_size,
                      load_generation_config, plan_batch_size, prefill, run_cli, runtime, sample, sampling_from,
                      setup_caches, sync)
from kivi_cache import CacheConfig
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

SYNC_EVERY = 16
FSYNC_EVERY_S = 5.0


@dataclass
class Job:
    id: str | int
    prompt: list[int]
    is_text: bool  # a "prompt" line, answered in text; else a "prompt_ids" line, answered in ids
    max_new_tokens: int
    temperature: float
    stop: list[str]
    tokens: list[int] = field(default_factory=list)  # generated so far (may run past the end)
    checked: int = 0  # leading tokens whose text holds no stop string


def decode_step_per_slot(model: Transformer, tokens: Tensor, input_pos: Tensor, temperature: Tensor,
                         s: Sampling) -> Tensor:
    """decode_step with one temperature per slot: temperature [B], 0 meaning greedy."""
    logits = model(tokens, input_pos=input_pos)[:, -1]
    hot = temperature > 0
    sampled = sample(logits, Sampling(torch.where(hot, temperature, 1.0)[:, None], s.top_k, s.top_p))
    return torch.where(hot, sampled, logits.argmax(-1))


def encode_prompt(r: dict, tokenizer: Tokenizer | None, vocab_size: int, chat: bool) -> list[int]:
    if "prompt_ids" in r:
        ids = r["prompt_ids"]
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab_size for t in ids):
            raise ValueError(f"prompt_ids must be a list of token ids in [0, {vocab_size})")
        if not ids:
            raise ValueError("empty prompt")
        return ids
    prompt = r.get("prompt")
    if prompt is None:
        raise ValueError("missing prompt")
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    if not prompt.strip():
        raise ValueError("empty prompt")
    if tokenizer is None:
        raise ValueError("no tokenizer (random weights): give prompt_ids")
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt, bos=tokenizer.add_bos)


def parse_record(r: object, seen: set, tokenizer: Tokenizer | None, args: ModelArgs, chat: bool, max_new_tokens: int,
                 temperature: float) -> Job:
    """One input record -> its job; a ValueError says what is wrong with it. Adds its id to seen."""
    if not isinstance(r, dict):
        raise ValueError("not a JSON object")
    id_ = r.get("id")
    if id_ is None:
        raise ValueError("missing id")
    if isinstance(id_, bool) or not isinstance(id_, str | int):
        raise ValueError("id must be a string or an integer")
    if id_ in seen:
        raise ValueError(f"duplicate id {id_!r}")
    seen.add(id_)
    prompt = encode_prompt(r, tokenizer, args.vocab_size, chat)
    if len(prompt) > args.max_seq_len - 1:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit the model's context of {args.max_seq_len}")
    max_new = r.get("max_new_tokens", max_new_tokens)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ValueError("max_new_tokens must be an integer >= 1")
    temp = r.get("temperature", temperature)
    if isinstance(temp, bool) or not isinstance(temp, int | float) or not temp >= 0:
        raise ValueError("temperature must be a number >= 0")
    stop = r.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError("stop must be a list of non-empty strings")
    is_text = "prompt_ids" not in r
    if stop and not is_text:
        raise ValueError("stop strings need a text prompt")
    return Job(id_, prompt, is_text, min(max_new, args.max_seq_len - len(prompt)), float(temp), stop)


def read_jobs(lines: list[str], tokenizer: Tokenizer | None, args: ModelArgs, chat: bool, max_new_tokens: int,
              temperature: float, done_ids: set, done_lines: set[int]) -> tuple[list[Job], list[dict]]:
    """The jobs of the input lines (numbered from 1; blank ones skipped) whose id is not in
    done_ids, and an error record for each bad line not in done_lines."""
    jobs, errors, seen = [], [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        r = None
        try:
            r = json.loads(line)
            job = parse_record(r, seen, tokenizer, args, chat, max_new_tokens, temperature)
        except ValueError as e:  # json.JSONDecodeError included
            if n not in done_lines:
                errors.append({"id": r.get("id") if isinstance(r, dict) else None, "error": str(e), "line": n})
            continue
        if job.id not in done_ids:
            jobs.append(job)
    return jobs, errors


def read_done(path: Path) -> tuple[set, set[int]]:
    """(ids completed, lines answered with an error) in an earlier run's output. First drops
    a partial last line, left by a run killed while writing it."""
    if not path.exists():
        return set(), set()
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        os.truncate(path, len(data))
    # split on b"\n" only: str.splitlines would also split at a U+2028 inside a completion
    records = [json.loads(line) for line in data.split(b"\n") if line.strip()]
    return {r["id"] for r in records if "error" not in r}, {r["line"] for r in records if "error" in r}


def write_record(f: TextIO, record: dict) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")  # one write of a whole line
    f.flush()


def finish(job: Job, tokenizer: Tokenizer | None, eos_ids: set[int]) -> dict | None:
    """The job's output record if it has ended (EOS, a stop string, max_new_tokens), else None.
    completion_tokens counts the tokens generated, the one that ended it included."""
    ids = job.tokens[: job.max_new_tokens]
    eos = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    end, n_tokens = (len(ids), len(ids)) if eos is None else (eos, eos + 1)
    reason = "eos" if eos is not None else "length" if len(ids) == job.max_new_tokens else None
    if job.is_text and (reason is not None or job.stop):
        text = tokenizer.decode(ids[:end])
        if cuts := [i for i in map(text.find, job.stop) if i >= 0]:
            text, reason = text[: min(cuts)], "stop"
            n_tokens = next(n for n in range(job.checked + 1, end + 1)
                            if any(s in tokenizer.decode(ids[:n]) for s in job.stop))
        job.checked = end
    if reason is None:
        return None
    completion = {"completion": text} if job.is_text else {"completion_ids": ids[:end]}
    return {"id": job.id, **completion, "prompt_tokens": len(job.prompt), "completion_tokens": n_tokens,
            "finish_reason": reason}


def pick_batch_size(requested: int | str, model: Transformer, cache: CacheConfig, max_seq_len: int,
                    n_prompts: int) -> int:
    """The slots to run, at most one per prompt: "auto" is 8 on CPU and the planner's largest
    batch on CUDA; a number is checked against the planner."""
    weight = model.tok_embeddings.weight
    if requested == "auto" and weight.device.type != "cuda":
        return min(8, n_prompts)
    return min(plan_batch_size(requested, model.args, cache, max_seq_len, weight.device, weight.dtype), n_prompts)


@torch.inference_mode()
def generate_jobs(model: Transformer, tokenizer: Tokenizer | None, jobs: list[Job], batch_size: int,
                  max_seq_len: int, cache: CacheConfig, sampling: Sampling, step, refill: bool,
                  stats: dict) -> Iterator[dict]:
    """Run the jobs in batch_size cache slots, yielding each one's record as it ends. A slot
    is refilled as soon as it is free, or (refill False) once every slot is free. The first
    item yielded is None, once the step is compiled and captured (the clock may start).
    stats["prefill_s"] and stats["decode_s"] accumulate the time of the refills' prefills and
    of the decode windows (steps until their tokens reach the host)."""
    device = model.tok_embeddings.weight.device
    eos_ids = tokenizer.eos_ids if tokenizer is not None else set()
    B, K = batch_size, SYNC_EVERY
    setup_caches(model, cache, B, max_seq_len)
    window = torch.zeros(B, K + 1, dtype=torch.long, device=device)  # column 0: each slot's next input
    input_pos = torch.zeros(B, dtype=torch.long, device=device)
    temperature = torch.zeros(B, device=device)
    for _ in range(3):  # compilation and CUDA-graph capture, on idle slots at position 0
        step(model, window[:, :1], input_pos, temperature, sampling)
    yield None
    slots: list[Job | None] = [None] * B
    pending = deque(jobs)
    while pending or any(job is not None for job in slots):
        fresh = set()
        t0 = time.perf_counter()  # the GPU is idle here: the last window ended with its tokens read
        if refill or all(job is None for job in slots):
            for b in range(B):
                if slots[b] is None and pending:
                    job = slots[b] = pending.popleft()
                    fresh.add(b)
                    window[b, 0] = prefill(model, [job.prompt], [b], replace(sampling, temperature=job.temperature))[0]
                    input_pos[b] = len(job.prompt)
                    temperature[b] = job.temperature
        sync(device)
        t1 = time.perf_counter()
        stats["prefill_s"] += t1 - t0
        if idle := [b for b in range(B) if slots[b] is None]:
            input_pos[idle] = 0  # idle slots run at the cheapest valid position; their output is ignored
        for k in range(K):
            window[:, k + 1] = step(model, window[:, k : k + 1], input_pos, temperature, sampling)
            input_pos.add_(1).clamp_(max=max_seq_len - 1)  # a slot past its end stays inside the cache
        new = window.tolist()
        stats["decode_s"] += time.perf_counter() - t1
        window[:, 0] = window[:, K]
        for b, job in enumerate(slots):
            if job is None:
                continue
            job.tokens += new[b][0 if b in fresh else 1 :]
            if (record := finish(job, tokenizer, eos_ids)) is not None:
                slots[b] = None
                yield record


def run_batch(model: Transformer, tokenizer: Tokenizer | None, lines: list[str], out_path: Path,
              batch_size: int | str, cache: CacheConfig, sampling: Sampling, max_new_tokens: int,
              step=decode_step_per_slot, chat: bool = False, refill: bool = True, stop_after: int | None = None,
              progress: bool = True) -> dict:
    """Answer every input line not yet answered in out_path, appending each record as its
    prompt ends; returns the run's stats. sampling holds the defaults of temperature (a line
    may set its own) and top-k/top-p. batch_size "auto": pick_batch_size. stop_after: return
    once that many prompts have ended (tests use it as a crash)."""
    t0 = time.perf_counter()
    done_ids, done_lines = read_done(out_path)
    jobs, errors = read_jobs(lines, tokenizer, model.args, chat, max_new_tokens, sampling.temperature,
                             done_ids, done_lines)
    max_seq_len = max((len(job.prompt) + job.max_new_tokens for job in jobs), default=0)
    batch_size = pick_batch_size(batch_size, model, cache, max_seq_len, len(jobs)) if jobs else 0
    stats = {"prompts": 0, "errors": len(errors), "tokens": 0, "batch_size": batch_size, "warmup_s": 0.0,
             "prefill_s": 0.0, "decode_s": 0.0}
    bar = tqdm(total=len(jobs), unit="prompt", disable=not progress)
    with open(out_path, "a", encoding="utf-8") as out, bar:
        for record in errors:
            write_record(out, record)
        if jobs:
            synced = time.perf_counter()
            for record in generate_jobs(model, tokenizer, jobs, batch_size, max_seq_len, cache, sampling, step,
                                        refill, stats):
                if record is None:  # warm-up done: compilation is not counted in the throughput
                    stats["warmup_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    continue
                write_record(out, record)
                if time.perf_counter() - synced > FSYNC_EVERY_S:  # flushed lines survive a crash of this process;
                    # fsync (against a crash of the machine) blocks the host, and so the GPU, for a disk write
                    os.fsync(out.fileno())
                    synced = time.perf_counter()
                stats["prompts"] += 1
                stats["tokens"] += record["completion_tokens"]
                bar.update()
                bar.set_postfix_str(f"{stats['tokens'] / (time.perf_counter() - t0):.1f} tokens/s")
                if stats["prompts"] == stop_after:
                    break
        os.fsync(out.fileno())
    stats["seconds"] = time.perf_counter() - t0
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="JSONL prompts")
    p.add_argument("output", type=Path, help="JSONL results, appended to (a re-run resumes)")
    p.add_argument("--checkpoint", help="a name under checkpoints/ or a path; with --random-weights a model shape")
    p.add_argument("--random-weights", action="store_true", help="random weights, no tokenizer: lines give prompt_ids")
    p.add_argument("--kv", default="kivi2", help="cache mode: fp16, kivi2, kivi4, k{2,4}v{2,4}")
    p.add_argument("--batch-size", type=parse_batch_size, default="auto", help="cache slots, or auto")
    p.add_argument("--no-refill", action="store_true", help="static batches: the next B prompts start when all B end")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    add_sampling_args(p)  # --max-new-tokens and --temperature: defaults for lines that do not set them
    add_runtime_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from checkpoint import resolve_checkpoint
    from scripts.benchmark import load_model
    from tokenizer import load_tokenizer

    args = parse_args(argv)
    checkpoint_dir = None if args.random_weights else resolve_checkpoint(args.checkpoint)
    sampling = sampling_from(args, None if checkpoint_dir is None else load_generation_config(checkpoint_dir))
    (cache,), device, dtype = runtime(args, args.kv)
    with open(args.input, encoding="utf-8") as f:
        lines = f.readlines()

    model = load_model(args.checkpoint, args.random_weights, device, dtype)
    tokenizer = None if checkpoint_dir is None else load_tokenizer(checkpoint_dir)
    cache.check(model.args.head_dim)
    torch.manual_seed(args.seed)
    step = compiled_if_asked(decode_step_per_slot, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = run_batch(model, tokenizer, lines, args.output, args.batch_size, cache, sampling, args.max_new_tokens,
                      step, args.chat, refill=not args.no_refill)
    peak = "n/a on CPU"
    if device.type == "cuda":
        retries = torch.cuda.memory_stats(device)["num_alloc_retries"]
        peak = f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB ({retries} allocator retries)"
    print(f"{stats['prompts']} prompts (bad lines: {stats['errors']}), {stats['tokens']} tokens in "
          f"{stats['seconds']:.1f} s (prefill {stats['prefill_s']:.1f} s, decode {stats['decode_s']:.1f} s, "
          f"host {stats['seconds'] - stats['prefill_s'] - stats['decode_s']:.1f} s): "
          f"{stats['tokens'] / max(stats['seconds'], 1e-9):.1f} tokens/s; "
          f"batch size {stats['batch_size']}, {args.kv} cache; peak memory {peak}; "
          f"compilation and warm-up {stats['warmup_s']:.1f} s before that", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
