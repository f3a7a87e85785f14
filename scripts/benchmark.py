"""End-to-end decode throughput and peak memory over cache modes and batch sizes.

    python scripts/benchmark.py --checkpoint llama-2-7b --random-weights --kv fp16,kivi2,kivi4 \\
        --prompt-len 160 --gen-len 338 --batch-size 1,8,32,64,128,auto

With --random-weights, --checkpoint names a model shape (or a folder whose config.json
gives one) built with random weights: speed does not depend on their values. Each point
runs a short warm-up generation (compilation and CUDA-graph capture), then a timed one on
the same caches; the compiled step is reset between points, so each batch gets its own graph
and no memory of an earlier one. A batch the memory planner says cannot fit is reported as
such and not run; `auto` is the planner's largest batch. --skip-prefill leaves prefill out
(for the largest batches, whose prefill would take longer than the decode measured): each
slot decodes from position --prompt-len over what its fresh cache holds (zeros), which costs
what a prefilled cache costs, since no kernel's time depends on the cached values; the
first token comes from uniform logits. Writes a table, a JSON file and a
PNG of throughput and peak memory against batch size per mode. The JSON is rewritten after
every point, and a run with the same settings and --out keeps the points already there:
an interrupted sweep resumes, and one split into several runs (one --kv mode each, say)
ends in one file and one plot.
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

import tp
from engine import LLM, load_model
from generate import add_runtime_args, run_cli, runtime
from kivi_cache import CacheConfig
from model import Transformer
from planner import device_budget, max_batch_size, planned_bytes


def no_prefill(model: Transformer, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
    """engine.prefill's stand-in under --skip-prefill: writes nothing, returns uniform logits."""
    return torch.zeros(len(prompts), model.args.vocab_size, device=model.tok_embeddings.weight.device)


def run_point(model: Transformer, cache: CacheConfig, batch_size: int, prompt_len: int, gen_len: int,
              compile: bool | None, skip_prefill: bool) -> dict:
    """One static batch of random prompts, greedy, no EOS: decode tokens/s over the steps run."""
    device = model.tok_embeddings.weight.device
    prompts = torch.randint(0, model.args.vocab_size, (batch_size, prompt_len)).tolist()
    llm = LLM.from_model(model, cache=cache, batch_size=batch_size, compile=compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with mock.patch("engine.prefill", no_prefill) if skip_prefill else contextlib.nullcontext():
        llm.generate([{"prompt": p} for p in prompts], max_new_tokens=gen_len, temperature=0)
    stats = llm.stats
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    kv_bytes = sum(b.numel() * b.element_size() for layer in model.layers for b in layer.attention.kv_cache.buffers())
    return {"tokens_per_s": batch_size * stats["decode_steps"] / stats["decode_s"], "prefill_s": stats["prefill_s"],
            "peak_memory_gb": peak / 1e9, "kv_cache_gb": kv_bytes / 1e9}


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["kv"] for r in results):
        ran = [r for r in results if r["kv"] == mode and r["fits"]]
        batches = [r["batch_size"] for r in ran]
        ax_speed.plot(batches, [r["tokens_per_s"] for r in ran], marker="o", label=mode)
        ax_mem.plot(batches, [r["peak_memory_gb"] for r in ran], marker="o", label=mode)
    for ax, label in ((ax_speed, "decode throughput (tokens/s)"), (ax_mem, "peak memory (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--kv", default="fp16,kivi2")
    p.add_argument("--prompt-len", type=int, default=160)
    p.add_argument("--gen-len", type=int, default=338)
    p.add_argument("--batch-size", default="1,8,32,auto", help="comma-separated batch sizes; auto: the planner's largest")
    add_runtime_args(p)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--memory-budget", type=float, help="GB the planner may fill (default: the device's memory)")
    p.add_argument("--skip-prefill", action="store_true", help="decode from --prompt-len without prefilling (see above)")
    p.add_argument("--out", type=Path, default=Path("results/benchmark"), help="writes OUT.json and OUT.png")
    args = p.parse_args(argv)

    caches, device, dtype = runtime(args, args.kv)
    device = tp.init(device.type) or device  # under torchrun: tensor parallel, rank 0 alone prints and writes
    writer = tp.rank() == 0
    if not writer:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    batch_sizes = [b if b == "auto" else int(b) for b in args.batch_size.split(",")]
    if any(b != "auto" and b < 1 for b in batch_sizes) or args.prompt_len < 1 or args.gen_len < 2:
        raise ValueError("batch sizes and --prompt-len must be at least 1, --gen-len at least 2")
    budget = int(args.memory_budget * 1e9) if args.memory_budget else device_budget(device)
    model = load_model(args.checkpoint, device, dtype, args.random_weights)[0]
    seq_len = args.prompt_len + args.gen_len
    if seq_len > model.args.max_seq_len:
        raise ValueError(f"--prompt-len + --gen-len = {seq_len} exceeds the model's context of {model.args.max_seq_len}")
    for cache in caches:
        cache.check(model.args.head_dim)
    meta = {"checkpoint": args.checkpoint, "random_weights": args.random_weights,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": str(dtype), "prompt_len": args.prompt_len, "gen_len": args.gen_len, "budget_gb": budget / 1e9}
    if args.skip_prefill:
        meta["skip_prefill"] = True
    if tp.world_size() > 1:
        meta["ranks"] = tp.world_size()
    json_path = args.out.with_suffix(".json")
    earlier = json.loads(json_path.read_text()) if json_path.exists() else {"meta": meta, "results": []}
    if earlier["meta"] != meta:
        raise ValueError(f"{json_path} holds a run with other settings ({earlier['meta']}): choose another --out")
    done = {(r["kv"], r["batch_size"]): r for r in earlier["results"]}

    points = {}  # (kv, batch) -> point
    for cache in caches:
        largest = max_batch_size(model.args, cache, seq_len, dtype, budget)
        for b in batch_sizes:
            batch = largest if b == "auto" else b
            if (cache.kv, batch) not in points and batch > 0:
                points[cache.kv, batch] = {
                    "kv": cache.kv, "batch_size": batch, "auto": b == "auto", "fits": batch <= largest,
                    "planned_peak_gb": planned_bytes(model.args, cache, seq_len, dtype, batch) / 1e9}
    if writer:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    results = [r for key, r in done.items() if key not in points]
    for key, point in tqdm(points.items(), desc="benchmark", unit="point", file=sys.stderr):
        cache = next(c for c in caches if c.kv == point["kv"])
        if key in done:
            point = done[key] | {"auto": point["auto"] or done[key]["auto"]}
        elif point["fits"]:
            torch._dynamo.reset()
            if point["auto"] and not args.memory_budget:  # earlier points' kernels and graphs take a little device memory
                now = max_batch_size(model.args, cache, seq_len, dtype, device_budget(device))
                if now < point["batch_size"]:
                    point.update(batch_size=now, planned_peak_gb=planned_bytes(model.args, cache, seq_len, dtype, now) / 1e9)
            point.update(run_point(model, cache, point["batch_size"], args.prompt_len, args.gen_len, args.compile,
                                   args.skip_prefill))
        results.append(point)
        if writer:
            json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")

    print(f"{'kv':>6} {'batch':>6} {'tokens/s':>10} {'peak GB':>8} {'planned':>8} {'kv GB':>7} {'prefill s':>9}")
    for r in results:
        if r["fits"]:
            print(f"{r['kv']:>6} {r['batch_size']:6d} {r['tokens_per_s']:10.1f} {r['peak_memory_gb']:8.2f} "
                  f"{r['planned_peak_gb']:8.2f} {r['kv_cache_gb']:7.3f} {r['prefill_s']:9.2f}" + ("  (auto)" if r["auto"] else ""))
        else:
            print(f"{r['kv']:>6} {r['batch_size']:6d}  does not fit: the planner needs {r['planned_peak_gb']:.1f} GB "
                  f"of {budget / 1e9:.1f}")
    if writer:
        plot(results, args.out.with_suffix(".png"), f"{args.checkpoint}, prompt {args.prompt_len}, generate {args.gen_len}")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    run_cli(main)
