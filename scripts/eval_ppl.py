"""Decode-path perplexity: every token goes through the real decode step, one at a time,
so each prediction attends to the cache exactly as decoding would hold it (a single
full-sequence forward would attend in full precision and measure nothing).

    python scripts/eval_ppl.py --kv fp16,kivi2,kivi4 --text wiki.utf8 --strip-tags

The file is tokenized once without special tokens; `--docs` consecutive windows of
`--tokens` tokens from its start run together as cache slots. A window of N tokens
contributes N - 1 scored tokens.
"""

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from checkpoint import load_checkpoint, resolve_checkpoint
from engine import setup_caches
from generate import add_runtime_args, run_cli, runtime
from kivi_cache import CacheConfig
from model import Transformer, build_model
from tokenizer import load_tokenizer


@torch.inference_mode()
def decode_path_nll(model: Transformer, windows: torch.Tensor, cache: CacheConfig) -> tuple[float, int]:
    """Summed negative log-likelihood and count of scored tokens, windows [n, N] fed one
    token per step through the decode path (window i in cache slot i)."""
    n, N = windows.shape
    setup_caches(model, cache, n, N)
    nll = torch.zeros((), dtype=torch.float64, device=windows.device)
    input_pos = torch.zeros(n, dtype=torch.long, device=windows.device)
    for t in tqdm(range(N - 1), desc=f"{cache.kv:>6}", unit="tok", leave=False, file=sys.stderr):
        logits = model(windows[:, t : t + 1], input_pos=input_pos)[:, -1]
        nll -= logits.log_softmax(-1).gather(1, windows[:, t + 1 : t + 2]).double().sum()
        input_pos += 1
    return float(nll), n * (N - 1)


def load_windows(path: Path, tokenizer, n_tokens: int, n_docs: int, strip_tags: bool) -> torch.Tensor:
    text = path.read_text(encoding="utf-8")
    if strip_tags:
        text = re.sub(r"<[^>]*>", "", text)
    ids = tokenizer.encode(text, bos=False)
    if len(ids) < n_tokens * n_docs:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than --docs {n_docs} x --tokens {n_tokens}")
    return torch.tensor(ids[: n_tokens * n_docs]).view(n_docs, n_tokens)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--kv", default="fp16,kivi2,kivi4", help="comma-separated cache modes")
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--strip-tags", action="store_true", help="remove <...> markup first")
    add_runtime_args(p)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    if args.tokens < 2 or args.docs < 1:
        raise ValueError("--tokens must be at least 2 and --docs at least 1")
    if args.json and not args.json.parent.is_dir():
        raise ValueError(f"--json {args.json}: there is no folder {args.json.parent}")
    caches, device, dtype = runtime(args, args.kv)
    path = resolve_checkpoint(args.checkpoint)
    model_args, state_dict = load_checkpoint(path, device, dtype)
    if args.tokens > model_args.max_seq_len:
        raise ValueError(f"--tokens {args.tokens} exceeds the model's context of {model_args.max_seq_len}")
    for cache in caches:
        cache.check(model_args.head_dim)
    model = build_model(model_args, state_dict, device, dtype)
    windows = load_windows(args.text, load_tokenizer(path), args.tokens, args.docs, args.strip_tags).to(device)

    results = {}
    for cache in caches:
        t0 = time.perf_counter()
        nll, count = decode_path_nll(model, windows, cache)
        results[cache.kv] = {"ppl": math.exp(nll / count), "tokens": count, "seconds": time.perf_counter() - t0}
    base = results.get("fp16", {}).get("ppl")
    print(f"{'mode':>8} {'ppl':>9} {'vs fp16':>8} {'tokens':>7} {'time s':>7}")
    for mode, r in results.items():
        delta = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base else "-"
        print(f"{mode:>8} {r['ppl']:9.3f} {delta:>8} {r['tokens']:7d} {r['seconds']:7.1f}")
    if args.json:
        args.json.write_text(json.dumps({m: {"ppl": r["ppl"], "tokens": r["tokens"]} for m, r in results.items()}, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)
