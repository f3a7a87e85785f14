"""Prefill rate, one prompt a forward as batch generation refills a slot, per cache mode and
prompt length: the part of a refill workload's time that no cache mode shortens.
Llama-2-7B shape, random bf16 weights. Needs CUDA.

    python benchmarks/prefill_rate.py [--profile N]

--profile N: also profile 8 prefills of N tokens in each mode and print the ops by host time.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.profiler import ProfilerActivity, profile

from engine import prefill, setup_caches
from kivi_cache import CacheConfig
from model import ModelArgs, build_model

parser = argparse.ArgumentParser()
parser.add_argument("--profile", type=int, default=0, help="prompt length to profile (0: none)")
args = parser.parse_args()

model = build_model(ModelArgs.from_name("llama-2-7b"), None, torch.device("cuda"), torch.bfloat16)
gen = torch.Generator().manual_seed(0)


def prefill_each(prompts: list[list[int]]) -> None:
    """Prefill prompt b into slot b, one forward each, and wait for the GPU."""
    for b, prompt in enumerate(prompts):
        prefill(model, [prompt], [b])
    torch.cuda.synchronize()


with torch.inference_mode():
    for mode in ("fp16", "kivi2"):
        setup_caches(model, CacheConfig(mode), 8, 2600)
        for length in (100, 1000, 2000):
            prompts = torch.randint(0, 32000, (8, length), generator=gen).tolist()
            prefill_each(prompts[:1])
            t0 = time.perf_counter()
            prefill_each(prompts)
            dt = (time.perf_counter() - t0) / len(prompts)
            print(f"prefill {mode:5} {length:5} tokens: {dt * 1e3:7.1f} ms a prompt, {length / dt:8.0f} tokens/s")
        if args.profile:
            prompts = torch.randint(0, 32000, (8, min(args.profile, 2600)), generator=gen).tolist()
            prefill_each(prompts[:1])
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                prefill_each(prompts)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
