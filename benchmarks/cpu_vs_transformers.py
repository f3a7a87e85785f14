"""Decode speed of the embedded model on the CPU: the engine (fp16 and kivi2 caches) against
transformers' generate on the same GGUF, float32, batch 1, greedy, in one run.

    python benchmarks/cpu_vs_transformers.py [--new-tokens 128] [--repeats 3] [--compile]

Engine: decode tokens/s of LLM.generate (its own clock: decode steps over their time).
transformers: (time of N + 1 new tokens - time of 1) / N, so that prefill is not counted
either. Each the best of --repeats rounds after a warm-up, a round running every path in
turn. --compile adds kivi2 with the decode step compiled (its compilation in the warm-up).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from checkpoint import embedded_gguf
from engine import LLM

PROMPT = "The key to a good night's sleep is"

p = argparse.ArgumentParser()
p.add_argument("--new-tokens", type=int, default=128)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--compile", action="store_true", help="also kivi2 with the decode step compiled")
args = p.parse_args()

engines = {name: LLM(kv=kv, device="cpu", batch_size=1, compile=compile)
           for name, kv, compile in (("fp16", "fp16", False), ("kivi2", "kivi2", False),
                                     *((("kivi2 compiled", "kivi2", True),) if args.compile else ()))}
tokenizer = engines["fp16"].tokenizer

from transformers import AutoModelForCausalLM  # noqa: E402

gguf = embedded_gguf()
hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
ids = torch.tensor([tokenizer.encode(PROMPT, bos=tokenizer.add_bos)])


def seconds(n: int) -> float:
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - t0


def engine_rate(llm: LLM, n: int) -> float:
    llm.generate([PROMPT], max_new_tokens=n, temperature=0)
    return llm.stats["decode_steps"] / llm.stats["decode_s"]


def transformers_rate(n: int) -> float:
    with torch.inference_mode():
        return n / (seconds(n + 1) - seconds(1))


measure = {**{name: lambda n, llm=llm: engine_rate(llm, n) for name, llm in engines.items()},
           "transformers": transformers_rate}
for f in measure.values():  # warm-up (and the compilation of the compiled step)
    f(8)
rates = dict.fromkeys(measure, 0.0)
for _ in range(args.repeats):  # rounds interleave the runs, so that a slower spell of the machine hits all alike
    for name, f in measure.items():
        rates[name] = max(rates[name], f(args.new_tokens))
print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, float32, batch 1, greedy, "
      f"{args.new_tokens} new tokens, best of {args.repeats}")
for name, rate in rates.items():
    print(f"{name:>14}: {rate:6.1f} tokens/s")
