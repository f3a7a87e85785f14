"""End-to-end decode throughput and peak memory over cache modes and batch sizes.

    python scripts/benchmark.py --checkpoint llama-2-7b --random-weights --kv fp16,kivi2 \\
        --prompt-len 1024 --gen-len 256 --batch-size 1

With --random-weights a named model shape is built with random weights (speed does not
depend on their values), so nothing needs downloading. Each point runs one short warm-up
generation (compilation and CUDA-graph capture), then a timed one on the same caches.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from generate import DTYPES, Sampling, decode_step, generate, pick_device
from kivi_cache import CacheConfig
from kivi_cache import parse_kv_mode
from model import ModelArgs, Transformer, build_model


def load_model(checkpoint: str | None, random_weights: bool, device: torch.device, dtype: torch.dtype) -> Transformer:
    if random_weights:
        if checkpoint is None:
            raise ValueError("--random-weights needs --checkpoint NAME, a model shape")
        torch.manual_seed(0)
        return build_model(ModelArgs.from_name(checkpoint), None, device, dtype)
    from checkpoint import load_checkpoint, resolve_checkpoint

    args, state_dict = load_checkpoint(resolve_checkpoint(checkpoint), device, dtype)
    return build_model(args, state_dict, device, dtype)


def run_point(model: Transformer, cache: CacheConfig, batch_size: int, prompt_len: int, gen_len: int, step) -> dict:
    device = model.tok_embeddings.weight.device
    prompts = torch.randint(0, model.args.vocab_size, (batch_size, prompt_len)).tolist()
    generate(model, prompts, min(gen_len, 16), Sampling(), cache, step=step)  # warm-up: compile, capture
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, stats = generate(model, prompts, gen_len, Sampling(), cache, step=step)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    kv_bytes = sum(b.numel() * b.element_size() for layer in model.layers for b in layer.attention.kv_cache.buffers())
    return {"kv": cache.kv, "batch_size": batch_size, "prompt_len": prompt_len, "gen_len": gen_len,
            "tokens_per_s": stats["decode_tokens_per_s"], "prefill_s": stats["prefill_s"],
            "peak_memory_gb": peak / 1e9, "kv_cache_gb": kv_bytes / 1e9}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--kv", default="fp16,kivi2")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--batch-size", default="1", help="comma-separated batch sizes")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--residual-length", type=int, default=128)
    p.add_argument("--sink-tokens", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    modes = [m.strip() for m in args.kv.split(",")]
    for mode in modes:
        parse_kv_mode(mode)
    batch_sizes = [int(b) for b in args.batch_size.split(",")]
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = load_model(args.checkpoint, args.random_weights, device, dtype)
    compiled = args.compile if args.compile is not None else device.type == "cuda"
    step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True) if compiled else decode_step

    results = []
    for mode in modes:
        cache = CacheConfig(mode, args.group_size, args.residual_length, args.sink_tokens)
        cache.check(model.args.head_dim)
        for batch_size in batch_sizes:
            results.append(run_point(model, cache, batch_size, args.prompt_len, args.gen_len, step))
            r = results[-1]
            print(f"{mode:>6} batch {batch_size:4d}: {r['tokens_per_s']:9.1f} tokens/s, "
                  f"peak {r['peak_memory_gb']:.2f} GB, kv {r['kv_cache_gb']:.3f} GB", file=sys.stderr)
    print(f"{'kv':>6} {'batch':>5} {'tokens/s':>10} {'peak GB':>8} {'kv GB':>7} {'prefill s':>9}")
    for r in results:
        print(f"{r['kv']:>6} {r['batch_size']:5d} {r['tokens_per_s']:10.1f} {r['peak_memory_gb']:8.2f} "
              f"{r['kv_cache_gb']:7.3f} {r['prefill_s']:9.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
