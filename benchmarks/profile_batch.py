"""Where a batch-generation run's time goes: runs the engine's scheduler on a
workload and profiles a stretch of it (records --from to --to), then prints the GPU kernels
by total time, the GPU's busy time against the wall time, and the run's own split into
prefill, decode windows and host. Llama-2-7B shape, random bf16 weights. Needs CUDA.

    python benchmarks/profile_batch.py results/workload.jsonl --kv kivi2 [--from 300 --to 340]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from engine import LLM
from kivi_cache import CacheConfig
from model import ModelArgs, build_model
from scripts.batch_generate import Line

p = argparse.ArgumentParser()
p.add_argument("workload", type=Path)
p.add_argument("--kv", default="kivi2")
p.add_argument("--from", dest="first", type=int, default=300, help="start profiling after this many records")
p.add_argument("--to", dest="last", type=int, default=340, help="stop after this many records")
args = p.parse_args()

torch.manual_seed(0)
model = build_model(ModelArgs.from_name("llama-2-7b"), None, torch.device("cuda"), torch.bfloat16)
llm = LLM.from_model(model, cache=CacheConfig(args.kv))
lines = [line for line in args.workload.read_text().splitlines() if line.strip()]
jobs = [job for n, line in enumerate(lines, 1)
        for job in llm.jobs([Line(n, json.loads(line)).request], max_new_tokens=256, temperature=0)]
if not 0 <= args.first < args.last <= len(jobs):
    sys.exit(f"need 0 <= --from < --to <= {len(jobs)} (the workload's prompts)")
records = llm.run(jobs)
for _ in range(args.first):
    next(records)
stats = llm.stats
before = dict(stats)
t0 = time.perf_counter()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(args.last - args.first):
        next(records)
    torch.cuda.synchronize()
wall = time.perf_counter() - t0
events = prof.key_averages()
# kernels only: a kernel's time also shows under the op that launched it
gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
print(events.table(sort_by="self_device_time_total", row_limit=25))
print(f"{args.kv}, batch {stats['batch_size']}, records {args.first}..{args.last}: wall {wall:.2f} s (profiled), "
      f"GPU busy {gpu_us / 1e6:.2f} s; prefill {stats['prefill_s'] - before['prefill_s']:.2f} s, "
      f"decode windows {stats['decode_s'] - before['decode_s']:.2f} s")
