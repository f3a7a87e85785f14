"""Prefill rate per cache mode and prompt length: 8 prompts prefilled one a forward against
packed into as few forwards as PREFILL_TOKENS allows (as batch generation prefills the
prompts of one refill), in tokens/s and as a share of the bf16 matmul rate measured in the
same run (an 8192^3 product on random data). Llama-2-7B shape, random bf16 weights. Needs CUDA.

    python benchmarks/prefill_rate.py [--profile N]

Model FLOPs of a prompt of T tokens: 2 per weight of the layers' linear maps per token, the
output head once (only the last position's logits are computed) and causal attention's
2 * 2 * T(T+1)/2 * heads * head_dim a layer.
--profile N: also profile 8 packed prefills of N tokens in each mode, ops by GPU time.
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


def matmul_tflops(n: int = 8192) -> float:
    """Mean rate of ten n^3 bf16 products on random data after three warm-ups."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (start.elapsed_time(end) * 1e-3) / 1e12


model_args = ModelArgs.from_name("llama-2-7b")
model = build_model(model_args, None, torch.device("cuda"), torch.bfloat16)
linear_weights = sum(p.numel() for name, p in model.layers.named_parameters() if p.dim() == 2)
gen = torch.Generator().manual_seed(0)


def prompt_flops(length: int) -> float:
    attention = 2 * 2 * length * (length + 1) / 2 * model_args.n_heads * model_args.head_dim * model_args.n_layers
    return 2 * linear_weights * length + 2 * model_args.dim * model_args.vocab_size + attention


def timed(prompts: list[list[int]], packed: bool) -> float:
    """Seconds to prefill prompt b into slot b, packed or one a forward, the GPU waited for."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if packed:
        prefill(model, prompts, list(range(len(prompts))))
    else:
        for b, prompt in enumerate(prompts):
            prefill(model, [prompt], [b])
    torch.cuda.synchronize()
    return time.perf_counter() - t0


peak = matmul_tflops()
print(f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s")
print(f"{'mode':5} {'prompt tokens':>13} {'way':>11} {'ms a prompt':>11} {'tokens/s':>9} {'TFLOP/s':>8} {'of matmul':>9}")
with torch.inference_mode():
    for mode in ("fp16", "kivi2"):
        setup_caches(model, CacheConfig(mode), 8, 2600)
        for lengths in ([100] * 8, [1000] * 8, [2000] * 8, torch.randint(100, 2001, (8,), generator=gen).tolist()):
            prompts = [torch.randint(0, 32000, (n,), generator=gen).tolist() for n in lengths]
            label = str(lengths[0]) if len(set(lengths)) == 1 else "100-2000"
            for packed in (False, True):
                timed(prompts, packed)  # warm-up on the same lengths: every kernel specialization compiled
                dt = timed(prompts, packed)
                tflops = sum(map(prompt_flops, lengths)) / dt / 1e12
                print(f"{mode:5} {label:>13} {'packed' if packed else 'one a call':>11} {dt / 8 * 1e3:11.1f} "
                      f"{sum(lengths) / dt:9.0f} {tflops:8.0f} {tflops / peak:9.0%}")
        if args.profile:
            prompts = torch.randint(0, 32000, (8, min(args.profile, 2600)), generator=gen).tolist()
            timed(prompts, True)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                timed(prompts, True)
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20))
