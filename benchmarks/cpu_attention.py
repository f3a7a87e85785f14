"""The cache's share of an eager CPU decode step, and the attention reference alone:

    python benchmarks/cpu_attention.py [--positions 500] [--new-tokens 384]

First times kernels/reference.py's decode_attention_reference on the embedded model's layer
shape (1 slot, 9 query heads on 3 kv heads, head_dim 64, float32, G 32, R 128) at --positions
positions, kivi2 (all but the ring's last run quantized) and a plain fp16-mode cache. Then
profiles one LLM.generate of --new-tokens on the CPU (cProfile) for each mode and prints the
time a step and the part of it spent in the cache's decode (append, flush, attention).
"""

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from engine import LLM
from kernels.reference import decode_attention_reference
from kivi_cache import n_quantized
from quantize_kv import quantize_keys, quantize_values

B, H, HQ, D, G, R = 1, 3, 9, 64, 32, 128
PROMPT = "The key to a good night's sleep is"


def reference_us(length: int, kivi: bool, repeats: int = 300) -> float:
    L = -(-max(length, 2 * R) // G) * G  # whole groups
    ring = R if kivi else L
    k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    store = (torch.randn(B, H, ring, D), torch.randn(B, H, ring, D), torch.empty(B, H, 0, D), torch.empty(B, H, 0, D),
             *quantize_keys(k, 2, G), *quantize_values(v, 2, G))
    n_q = n_quantized(length, R, G) if kivi else 0
    args = (torch.randn(B, HQ, D), *store, torch.tensor([length], dtype=torch.int32),
            torch.tensor([n_q], dtype=torch.int32), 2, 2, G, D**-0.5)
    for _ in range(20):
        decode_attention_reference(*args)
    t0 = time.perf_counter()
    for _ in range(repeats):
        decode_attention_reference(*args)
    return (time.perf_counter() - t0) / repeats * 1e6


def profile_generate(kv: str, new_tokens: int) -> tuple[float, float]:
    """(ms a decode step, ms of it in the cache's decode) of one generate under cProfile."""
    llm = LLM(kv=kv, device="cpu", batch_size=1, compile=False)
    llm.generate([PROMPT], max_new_tokens=8, temperature=0)
    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate([PROMPT], max_new_tokens=new_tokens, temperature=0)
    profiler.disable()
    steps = llm.stats["decode_steps"]
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    in_cache = sum(v[3] for (file, _, name), v in stats.items() if file.endswith("kivi_cache.py") and name == "decode")
    return llm.stats["decode_s"] / steps * 1e3, in_cache / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--positions", type=int, default=500)
    p.add_argument("--new-tokens", type=int, default=384)
    args = p.parse_args()
    if args.positions <= R or args.new_tokens < 1:
        sys.exit(f"error: --positions must exceed the ring's {R} and --new-tokens be positive")
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, float32")
    print(f"reference attention, one layer at {args.positions} positions: "
          f"kivi2 {reference_us(args.positions, True):.0f} us, fp16 {reference_us(args.positions, False):.0f} us")
    for kv in ("fp16", "kivi2"):
        step, cache = profile_generate(kv, args.new_tokens)
        print(f"{kv}: {step:.1f} ms a decode step under cProfile, {cache:.1f} ms ({cache / step:.0%}) in the cache")


if __name__ == "__main__":
    main()
