"""Download a Hugging Face Llama-family model and convert it to an engine checkpoint."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from huggingface_hub import snapshot_download  # noqa: E402

from checkpoint import CHECKPOINTS_DIR, HF_TOKENIZER_FILES, CheckpointError, convert_hf  # noqa: E402


def download(repo_id: str, out: Path, token: str | None = None) -> None:
    """Fetches into the Hugging Face cache: safetensors weights, else .bin ones where the repo has none."""
    files = ["config.json", *HF_TOKENIZER_FILES]
    safetensors = ["model*.safetensors", "model.safetensors.index.json"]
    hf_dir = Path(snapshot_download(repo_id, token=token, allow_patterns=files + safetensors))
    if not any(hf_dir.glob("model*.safetensors")):
        bins = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
        hf_dir = Path(snapshot_download(repo_id, token=token, allow_patterns=files + bins))
    convert_hf(hf_dir, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("repo_id", help="e.g. HuggingFaceTB/SmolLM2-360M-Instruct")
    parser.add_argument("--token", help="Hugging Face token for gated models (default: HF_TOKEN or the saved login)")
    parser.add_argument("--out", type=Path, help="checkpoint directory (default: checkpoints/NAME, NAME the repo's name in lower case)")
    args = parser.parse_args(argv)
    out = args.out or CHECKPOINTS_DIR / args.repo_id.split("/")[-1].lower()
    try:
        download(args.repo_id, out, args.token)
    except (CheckpointError, OSError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
