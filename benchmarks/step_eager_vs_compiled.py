"""Decode step time, eager vs compiled, per cache mode, on a 4-layer Llama-2-7B-width model
(random bf16 weights, batch 1, 1024-token prompt, 1280-token cache). Needs CUDA.

    python benchmarks/step_eager_vs_compiled.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch._dynamo.utils

from engine import LLM
from kivi_cache import CacheConfig
from model import ModelArgs, build_model

args = ModelArgs.from_name("llama-2-7b")
args.n_layers = 4
model = build_model(args, None, torch.device("cuda"), torch.bfloat16)
prompt = {"prompt": list(range(1, 1025))}
for mode in ("fp16", "kivi2"):
    for name, compile in (("eager", False), ("compiled", True)):
        llm = LLM.from_model(model, cache=CacheConfig(mode), batch_size=1, compile=compile)
        llm.generate([prompt], max_new_tokens=128, temperature=0)
        print(f"{mode} {name}: {1000 * llm.stats['decode_s'] / llm.stats['decode_steps']:.2f} ms a step (4 layers)")
c = torch._dynamo.utils.counters
print("frames", c["stats"]["unique_graphs"], "graph breaks", dict(c["graph_break"]),
      "cudagraph skips", c["inductor"]["cudagraph_skips"])

# Where a compiled fp16 step's GPU time goes: 16 steps, kernels by total time.
llm = LLM.from_model(model, cache=CacheConfig("fp16"), batch_size=1, compile=True)
llm.generate([prompt], max_new_tokens=17, temperature=0)  # compiled and captured
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    llm.generate([prompt], max_new_tokens=17, temperature=0)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
