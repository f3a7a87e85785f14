"""Long-context retrieval through each cache mode: a needle sentence hidden at several
depths of essay filler at several context lengths, and synthetic passkey retrieval.

    python scripts/fetch_data.py     # once: data/essays/*.txt
    python scripts/eval_needle.py --kv fp16,kivi2,kivi4 --lengths 1024,2048,4096,8000

The prompts of one length (all depths) run together as cache slots; the answer is
generated greedily through the decode path, so every answer token attends to the
quantized cache. A needle answer counts when it names the sandwich or Dolores Park; a
passkey answer when it contains the key's digits. Writes a table, `needle.json` and one
depth x length heatmap PNG per mode into --out-dir.
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm

from engine import LLM, load_model
from generate import add_runtime_args, run_cli, runtime
from tokenizer import Tokenizer

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
NEEDLE_QUESTION = ("\n\nQuestion: What is the best thing to do in San Francisco?\n"
                   "Answer: The best thing to do in San Francisco is")
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_LINE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
DATA = Path(__file__).resolve().parent.parent / "data"


def with_insert(tokenizer: Tokenizer, head: str, filler: list[int], insert: str, tail: str, length: int,
                depth: float) -> list[int]:
    """head + filler with `insert` at `depth` (0..1) of the filler + tail, `length` tokens.
    The insert goes after a sentence end of the filler, at or before the depth."""
    head_ids, insert_ids, tail_ids = (tokenizer.encode(t, bos=False) for t in (head, insert, tail))
    n_filler = length - len(head_ids) - len(insert_ids) - len(tail_ids) - int(tokenizer.add_bos)
    if n_filler < 1 or n_filler > len(filler):
        raise ValueError(f"a {length}-token prompt does not fit this filler and question")
    body = filler[:n_filler]
    at = round(depth * n_filler)
    while 0 < at < n_filler and not tokenizer.decode(body[at - 1 : at]).rstrip().endswith("."):
        at -= 1
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    return bos + head_ids + body[:at] + insert_ids + body[at:] + tail_ids


def build_cases(tokenizer: Tokenizer, essays: str, lengths: list[int], depths: list[float], seed: int) -> list[dict]:
    essay_ids = tokenizer.encode(essays, bos=False)
    passkey_ids = tokenizer.encode(PASSKEY_FILLER * (max(lengths) // 10 + 1), bos=False)
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        for depth in depths:
            cases.append({"task": "needle", "length": length, "depth": depth, "answer": ("sandwich", "dolores park"),
                          "ids": with_insert(tokenizer, "", essay_ids, NEEDLE, NEEDLE_QUESTION, length, depth)})
            key = str(rng.randint(10000, 99999))
            cases.append({"task": "passkey", "length": length, "depth": depth, "answer": (key,),
                          "ids": with_insert(tokenizer, PASSKEY_INTRO, passkey_ids, PASSKEY_LINE.format(key=key),
                                             PASSKEY_QUESTION, length, depth)})
    return cases


def heatmap(path: Path, mode: str, records: list[dict], lengths: list[int], depths: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(lengths), 3 + 0.3 * len(depths)), squeeze=False)
    for ax, task in zip(axes[0], ("needle", "passkey")):
        grid = [[next(r["correct"] for r in records if r["task"] == task and r["length"] == n and r["depth"] == d)
                 for n in lengths] for d in depths]
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("depth")
        ax.set_title(f"{task} retrieval, {mode}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--kv", default="fp16,kivi2,kivi4")
    p.add_argument("--lengths", default="1024,2048,4096,8000", help="context lengths in tokens, up to the model's")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--essays", type=Path, default=DATA / "essays", help="folder of filler .txt files")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    add_runtime_args(p)
    p.add_argument("--out-dir", type=Path, default=Path("results/needle"))
    args = p.parse_args(argv)

    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError("--depths must lie in [0, 1]")
    files = sorted(args.essays.glob("*.txt"))
    if not files:
        raise ValueError(f"no filler essays in {args.essays}: run scripts/fetch_data.py first")
    caches, device, dtype = runtime(args, args.kv)
    model, tokenizer, _ = load_model(args.checkpoint, device, dtype)
    if max(lengths) + args.max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"--lengths up to {max(lengths)} + {args.max_new_tokens} new tokens exceed the model's "
                         f"context of {model.args.max_seq_len}")
    for cache in caches:
        cache.check(model.args.head_dim)
    cases = build_cases(tokenizer, "\n\n".join(f.read_text(encoding="utf-8") for f in files), lengths, depths, args.seed)

    records = []
    with tqdm(total=len(caches) * len(lengths), desc="needle", unit="length", file=sys.stderr) as bar:
        for cache in caches:
            for length in lengths:
                batch = [c for c in cases if c["length"] == length]
                llm = LLM.from_model(model, tokenizer, cache, batch_size=len(batch))
                completions = llm.generate([{"prompt": c["ids"]} for c in batch], max_new_tokens=args.max_new_tokens,
                                           temperature=0)
                for case, completion in zip(batch, completions):
                    text = completion.text
                    correct = any(a in text.lower() for a in case["answer"])
                    records.append({"kv": cache.kv, "task": case["task"], "length": length, "depth": case["depth"],
                                    "correct": int(correct), "answer": text})
                bar.update()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "needle.json").write_text(json.dumps(records, indent=2) + "\n")
    print(f"{'kv':>6} {'task':>8} " + " ".join(f"{n:>6}" for n in lengths) + "   (accuracy over depths)")
    for cache in caches:
        mode_records = [r for r in records if r["kv"] == cache.kv]
        for task in ("needle", "passkey"):
            accs = [sum(r["correct"] for r in mode_records if r["task"] == task and r["length"] == n) / len(depths)
                    for n in lengths]
            print(f"{cache.kv:>6} {task:>8} " + " ".join(f"{a:6.2f}" for a in accs))
        heatmap(args.out_dir / f"needle_{cache.kv}.png", cache.kv, mode_records, lengths, depths)
    print(f"wrote {args.out_dir / 'needle.json'} and {len(caches)} heatmaps")


if __name__ == "__main__":
    run_cli(main)
