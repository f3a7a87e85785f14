"""Write a seeded workload for scripts/batch_generate.py: N prompts with token lengths uniform
in [--min-len, --max-len] and max_new_tokens uniform in [--min-new, --max-new].

    python scripts/make_workload.py OUT.jsonl [--n 1000] [--checkpoint NAME]
    python scripts/make_workload.py OUT.jsonl --token-ids --vocab-size 32000

Text prompts are words of a fixed list, measured with the checkpoint's tokenizer as
batch_generate encodes them (without --chat). --token-ids writes random "prompt_ids"
instead, for models with random weights and no tokenizer.
"""

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generate import run_cli  # noqa: E402

WORDS = """the of and to in is was for that with as on by at from his her they this which an be are or
had not but have one were their all there has been first its new time after who also two more other
when into only some over such city year world work people state water school music house river war
light early small great long place high part life family power under between during while known
later many most found three north south history name game team word story point group number field
""".split()


def text_prompt(rng: random.Random, encode: Callable[[str], list[int]], length: int, max_len: int) -> str:
    """Words whose encoding has `length` to `max_len` tokens (`length` if the last word allows)."""
    words, n = [], 0
    while n < length:
        words += rng.choices(WORDS, k=max(1, (length - n) // 2))  # a word is one or two tokens
        n = len(encode(" ".join(words)))
    while n > max_len:
        words.pop()
        n = len(encode(" ".join(words)))
    return " ".join(words)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", type=Path)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=2000)
    p.add_argument("--min-new", type=int, default=50)
    p.add_argument("--max-new", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="whose tokenizer measures text prompts (default: the embedded model)")
    p.add_argument("--token-ids", action="store_true", help="write random prompt_ids, no tokenizer needed")
    p.add_argument("--vocab-size", type=int, default=32000, help="with --token-ids: ids are in [0, V)")
    args = p.parse_args(argv)
    if not 1 <= args.min_len <= args.max_len or not 1 <= args.min_new <= args.max_new:
        raise ValueError("need 1 <= --min-len <= --max-len and 1 <= --min-new <= --max-new")

    if not args.token_ids:
        from checkpoint import resolve_checkpoint
        from tokenizer import load_tokenizer

        tokenizer = load_tokenizer(resolve_checkpoint(args.checkpoint))
        encode = lambda text: tokenizer.encode(text, bos=tokenizer.add_bos)  # noqa: E731
    rng = random.Random(args.seed)
    with open(args.output, "w", encoding="utf-8") as f:
        for i in range(args.n):
            length = rng.randint(args.min_len, args.max_len)
            if args.token_ids:
                prompt = {"prompt_ids": [rng.randrange(args.vocab_size) for _ in range(length)]}
            else:
                prompt = {"prompt": text_prompt(rng, encode, length, args.max_len)}
            f.write(json.dumps({"id": i, **prompt, "max_new_tokens": rng.randint(args.min_new, args.max_new)}) + "\n")


if __name__ == "__main__":
    run_cli(main)
