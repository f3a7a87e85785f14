"""Matrix products of the embedded model's weights on the CPU in the two layouts that
model.use_cpu_layout chooses between:

    python benchmarks/cpu_layout.py [--rows 1 2 4 8 64]

For each weight shape of the model (random float32 weights: speed does not depend on the
values), F.linear of a [rows, in] input over every matrix of that shape the model holds,
distinct ones, so that they stream from memory as in a decode step: row-major [out, in]
against column-major, best of 3 passes. Then the total for one step of that many rows with
every matrix row-major against the layouts use_cpu_layout picks.
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from checkpoint import resolve_checkpoint
from model import ModelArgs, build_model

p = argparse.ArgumentParser()
p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 64])
args = p.parse_args()

model = build_model(ModelArgs.load(resolve_checkpoint(None) / "config.json"), None, torch.device("cpu"), torch.float32)
by_shape = defaultdict(list)  # (out, in) -> the model's matrices of that shape, in the layout it picked
for m in model.modules():
    if isinstance(m, torch.nn.Linear):
        by_shape[tuple(m.weight.shape)].append(m.weight)
if model.output is None:
    by_shape[tuple(model.tok_embeddings.weight.shape)].append(model.tok_embeddings.weight)


def seconds(x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for w in weights:
            F.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return best


print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, float32")
for rows in args.rows:
    total_row, total_picked = 0.0, 0.0
    for (n_out, n_in), weights in by_shape.items():
        x = torch.randn(rows, n_in)
        row_major = [w.contiguous() for w in weights]
        column_major = [w.T.contiguous().T for w in weights]
        t_row, t_col = seconds(x, row_major), seconds(x, column_major)
        picked = t_row if weights[0].is_contiguous() else t_col
        total_row, total_picked = total_row + t_row, total_picked + picked
        if rows == args.rows[0]:
            gbs = n_out * n_in * 4 * len(weights) / 1e9
            print(f"  {len(weights):>2} x [{n_out}, {n_in}], {rows} rows: row-major {t_row * 1e3:6.2f} ms "
                  f"({gbs / t_row:4.1f} GB/s), column-major {t_col * 1e3:6.2f} ms ({gbs / t_col:4.1f} GB/s), "
                  f"picked {'row' if weights[0].is_contiguous() else 'column'}-major")
        del row_major, column_major
    print(f"{rows:>3} rows: every matrix row-major {total_row * 1e3:6.1f} ms a step, as picked "
          f"{total_picked * 1e3:6.1f} ms ({total_row / total_picked:.2f}x)")
