"""Download a Hugging Face model into a checkpoint directory that loads as it is."""

import argparse
import re
import sys
from fnmatch import fnmatch
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from huggingface_hub import list_repo_files, snapshot_download  # noqa: E402
from huggingface_hub.errors import GatedRepoError, HTTPError, RepositoryNotFoundError  # noqa: E402

from checkpoint import CHECKPOINTS_DIR, HF_TOKENIZER_FILES, convert_hf, resolve_checkpoint  # noqa: E402

SAFETENSORS = ["model*.safetensors", "model.safetensors.index.json"]
BINS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"{_NAME}/{_NAME}")  # the Hub's rules, with the owner required


def download(repo_id: str, out: Path, token: str | None = None) -> None:
    """Safetensors weights, config and tokenizer straight into `out`, the Hugging Face directory
    as it is; a repo with only .bin weights goes through the Hugging Face cache and is converted."""
    files = ["config.json", *HF_TOKENIZER_FILES]
    if any(fnmatch(name, SAFETENSORS[0]) for name in list_repo_files(repo_id, token=token)):
        snapshot_download(repo_id, token=token, allow_patterns=files + SAFETENSORS, local_dir=out)
        resolve_checkpoint(str(out))  # an unsupported model fails now, not when it is first run
    else:
        convert_hf(Path(snapshot_download(repo_id, token=token, allow_patterns=files + BINS)), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("repo_id", help="e.g. HuggingFaceTB/SmolLM2-360M-Instruct")
    parser.add_argument("--token", help="Hugging Face token for gated models (default: HF_TOKEN or the saved login)")
    parser.add_argument("--out", type=Path, help="checkpoint directory (default: checkpoints/NAME, NAME the repo's name in lower case)")
    args = parser.parse_args(argv)
    if not REPO_ID.fullmatch(args.repo_id) or any(x in args.repo_id for x in ("..", "--")) or args.repo_id.endswith(".git"):
        return fail(f"{args.repo_id!r} is not a Hugging Face repo id (owner/name, of letters, digits, '-', '_' and '.')")
    out = args.out or CHECKPOINTS_DIR / args.repo_id.split("/")[-1].lower()
    try:
        download(args.repo_id, out, args.token)
    except GatedRepoError:
        return fail(f"{args.repo_id} is gated: accept its terms on https://huggingface.co/{args.repo_id}, "
                    f"then pass --token or log in (hf auth login)")
    except RepositoryNotFoundError:
        return fail(f"no repo {args.repo_id} on the Hugging Face Hub (a private one needs --token)")
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        return fail(str(e).strip().splitlines()[0])
    except HTTPError as e:  # a network error; the Hub's own HTTP errors are OSErrors
        return fail(f"cannot reach the Hugging Face Hub: {e}")
    print(f"wrote {out}")
    return 0


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
