"""Convert a Hugging Face checkpoint directory (safetensors or .bin weights) to the engine's format.

A directory of safetensors loads as it is too: converting it only makes a second copy.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import CheckpointError, convert_hf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf-dir", type=Path, required=True, help="directory with config.json, weights and tokenizer files")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    args = parser.parse_args(argv)
    try:
        convert_hf(args.hf_dir, args.out)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
