"""Generate text with a static KV cache (fp16 or KIVI), streaming it as it is produced.

    python generate.py [--checkpoint NAME|PATH] [--kv fp16|kivi2|kivi4|k4v2 ...] [--prompt TEXT]
    python generate.py --interactive [--system TEXT]   a multi-turn chat, the cache kept between turns

A command over engine.LLM: the prompt is prefilled in full precision, then each decode step
(compiled into a CUDA graph on CUDA) feeds one token per cache slot. Under
`torchrun --nproc-per-node N generate.py ...` the model runs tensor parallel over N ranks
(tp.py) and rank 0 alone prints. With --batch-size N the
prompt runs N times, each with its own sampling noise, and every text is printed at the end.
The shared command-line options of the project's commands live here too.
"""

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from engine import DTYPES, LLM, Chat, SamplingParams, pick_device, pick_dtype, plan_batch_size
from kivi_cache import CacheConfig, parse_kv_mode
import tp
from planner import cache_slot_bytes

STREAM_EVERY = 4  # decode steps between two looks at the tokens while streaming


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The options every command shares: KIVI settings, device and dtype."""
    p.add_argument("--group-size", type=int, default=32, help="KIVI quantization group G")
    p.add_argument("--residual-length", type=int, default=128, help="full-precision ring R")
    p.add_argument("--sink-tokens", type=int, default=0, help="first tokens kept in full precision")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")


def runtime(args: argparse.Namespace, kv_modes: str) -> tuple[list[CacheConfig], torch.device, torch.dtype]:
    """The cache configs of a comma-separated --kv value, and the device and dtype."""
    modes = [m.strip() for m in kv_modes.split(",") if m.strip()]
    if not modes:
        raise ValueError("--kv names no mode")
    for mode in modes:
        parse_kv_mode(mode)
    device = pick_device(args.device)
    return ([CacheConfig(m, args.group_size, args.residual_length, args.sink_tokens) for m in modes], device,
            pick_dtype(args.dtype, device))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Generation options shared by generate.py and batch generation."""
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, help="0: greedy (default: generation_config.json's, else 0.8)")
    p.add_argument("--top-k", type=int, help="0: off (default: generation_config.json's, else 200)")
    p.add_argument("--top-p", type=float, help="1: off (default: generation_config.json's, else 1)")
    p.add_argument("--seed", type=int, default=1234, help="seeds the requests that have none of their own")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step (default: on for CUDA, off for CPU)")


def sampling_from(args: argparse.Namespace) -> dict:
    """The sampling fields given on the command line (the others keep the engine's defaults:
    the checkpoint's generation_config.json, else SamplingParams'), checked; seeds torch."""
    given = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p")
             if getattr(args, k) is not None}
    try:
        SamplingParams().update(given)
    except ValueError as e:
        raise ValueError(f"--{str(e).replace('_', '-')}") from None
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2^63), got {args.seed}")
    torch.manual_seed(args.seed)
    return given


def run_cli(main: Callable[[], None]) -> None:
    """Run a command's main: an expected failure prints one line and exits 1; Ctrl-C exits 130."""
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


def parse_batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got '{value}'")
    return int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a name under checkpoints/ or a path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--kv", default="fp16", help="cache mode: fp16, kivi2, kivi4, k{2,4}v{2,4}")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="The key to a good night's sleep is")
    prompt.add_argument("--prompt-file", type=Path)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--interactive", action="store_true", help="chat turn after turn on stdin (Ctrl-D ends)")
    p.add_argument("--system", help="the system message of --interactive")
    p.add_argument("--batch-size", type=parse_batch_size, default=1, help="a number, or auto: the largest that fits")
    add_sampling_args(p)
    add_runtime_args(p)
    return p.parse_args(argv)


class TextStream:
    """Prints request 0's completion as its tokens arrive (a partial character held back)."""

    def __init__(self, llm: LLM):
        self.llm, self.printed = llm, ""

    def __call__(self, jobs: list) -> None:
        job = next((j for j in jobs if j.request == 0), None)
        if job is not None:
            ids = job.tokens[: job.params.max_new_tokens]
            ends = [i for i, t in enumerate(ids) if t in self.llm.eos_ids]
            self.show(self.llm.tokenizer.decode(ids[: ends[0]] if ends else ids).removesuffix("\ufffd"))

    def show(self, text: str) -> None:
        print(text[len(self.printed) :] if text.startswith(self.printed) else "", end="", flush=True)
        self.printed = text if text.startswith(self.printed) else self.printed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if tp.rank() > 0:  # under torchrun rank 0 alone prints (every rank computes the same tokens)
        sys.stdout = sys.stderr = open(os.devnull, "w")
    caches, _, _ = runtime(args, args.kv)
    if len(caches) != 1:
        raise ValueError(f"--kv {args.kv}: generate.py runs one cache mode (scripts/benchmark.py compares several)")
    sampling = sampling_from(args)
    if args.interactive and tp.world_size() > 1:
        raise ValueError("--interactive runs in one process, not under torchrun")
    text = args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else args.prompt
    if not text.strip():
        raise ValueError("the prompt is empty")
    llm = LLM(args.checkpoint, kv=args.kv, device=args.device, dtype=args.dtype, compile=args.compile,
              group_size=args.group_size, residual_length=args.residual_length, sink_tokens=args.sink_tokens)
    if args.interactive:
        return interactive(llm, args.system, sampling)
    request = [{"role": "user", "content": text}] if args.chat else text
    try:
        (job,) = llm.jobs([request], **sampling)
    except ValueError as e:
        raise ValueError(str(e).removeprefix("request 0: ").replace("max_new_tokens", "--max-new-tokens")) from None
    total = len(job.prompt) + job.params.max_new_tokens
    llm.batch_size = plan_batch_size(args.batch_size, llm.model.args, llm.cache, total, llm.device, llm.dtype)
    jobs = llm.jobs([request] * llm.batch_size, **sampling)
    if llm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(llm.device)
    streaming = llm.batch_size == 1
    after_prompt = "\n" if args.chat else ""  # a chat reply starts on a line of its own
    stream = TextStream(llm)
    if streaming:
        llm.sync_every = STREAM_EVERY
        print(text, end=after_prompt, flush=True)
    completions = sorted(llm.run(jobs, on_window=stream if streaming else None), key=lambda c: c.request)
    for c in completions:
        if streaming:
            stream.show(c.text)
            print()
        else:
            print(f"--- sequence {c.request}\n{text}{after_prompt}{c.text}")
    model_args, stats, B = llm.model.args, llm.stats, llm.batch_size
    steps = max(c.completion_tokens for c in completions) - 1
    kv = cache_slot_bytes(model_args, llm.cache, total, llm.dtype)
    fp = cache_slot_bytes(model_args, CacheConfig("fp16"), total, llm.dtype)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    log(f"\nprefill: {stats['prefill_s'] * 1000:.1f} ms for {B} x {len(job.prompt)} tokens")
    log(f"decode: {B * steps / max(stats['decode_s'], 1e-9):.1f} tokens/s ({steps} steps, batch {B})")
    log(f"kv cache ({llm.cache.kv}): {B * kv / 1e6:.2f} MB for {B} x {total} tokens, "
        f"{kv / total:.0f} B/token, {kv / fp:.3f}x the size of an fp16 cache ({fp / total:.0f} B/token)")
    if llm.device.type == "cuda":
        log(f"peak memory: {torch.cuda.max_memory_allocated(llm.device) / 1e9:.2f} GB")


def interactive(llm: LLM, system: str | None, sampling: dict) -> None:
    """Read a user turn a line, stream the reply; the chat's cache holds the conversation."""
    chat = Chat(llm, system)  # it streams a token at a time
    while True:
        try:
            text = input("> ")
        except EOFError:
            print()
            return
        if text.strip():
            stream = TextStream(llm)
            reply = chat.send(text, on_window=stream, **sampling)
            stream.show(reply.text)
            print()


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
