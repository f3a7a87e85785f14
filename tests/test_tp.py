"""Tensor parallelism on the CPU (gloo, torchrun): three ranks give what one process gives on
the embedded model (9 query heads, 3 kv heads, MLP 1536), two are refused, and each rank
loads exactly its slices."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint, resolve_checkpoint
from model import ModelArgs, build_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based ink and a wooden press into a system that could produce books far faster "
          "than scribes.")  # with R = 32 the prompt and the decode steps flush
KIVI = ["--kv", "kivi2", "--residual-length", "32"]


@pytest.fixture(scope="module", autouse=True)
def embedded_checkpoint():
    resolve_checkpoint(None)  # imported once, before several processes would race to import it


def command(script: str, ranks: int, *args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return subprocess.run([*(launcher if ranks > 1 else [sys.executable]), str(ROOT / script), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kv", [["--kv", "fp16"], KIVI], ids=["fp16", "kivi2"])
def test_three_ranks_generate_what_one_process_generates(kv):
    args = ["--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "24", *kv]
    one, three = command("generate.py", 1, *args), command("generate.py", 3, *args)
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-2000:]
    assert three.stdout == one.stdout and three.stdout.startswith(PROMPT)


def test_three_ranks_batch_generation_with_refills_equals_one_process(tmp_path):
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fibonacci(n):",
               PROMPT, "1, 2, 3, 4, 5,"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": p, "max_new_tokens": 6 + 5 * i}) + "\n"
                                               for i, p in enumerate(prompts)))
    outputs = []
    for ranks in (1, 3):
        out = tmp_path / f"out{ranks}.jsonl"
        r = command("scripts/batch_generate.py", ranks, str(tmp_path / "in.jsonl"), str(out), "--batch-size", "2",
                    "--temperature", "0", *KIVI)
        assert r.returncode == 0, r.stderr[-2000:]
        outputs.append(sorted(out.read_text().splitlines()))
    assert outputs[0] == outputs[1] and len(outputs[0]) == len(prompts)


def test_two_ranks_are_refused_before_any_weights_load():
    r = command("generate.py", 2, "--max-new-tokens", "2")
    assert r.returncode != 0 and r.stdout == ""
    assert ("error: 2 ranks do not divide the model's query heads 9, kv heads 3 (tensor parallelism splits query "
            "heads 9, kv heads 3 and MLP width 1536 evenly)") in r.stderr.splitlines()


def test_each_rank_loads_exactly_its_slices(tmp_path):
    from safetensors.torch import save_file

    args = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=3, intermediate_size=60, vocab_size=50,
                     max_seq_len=64, qkv_bias=True)
    torch.manual_seed(0)
    full = {k: v.contiguous() for k, v in build_model(args, None, torch.device("cpu"), torch.float32).state_dict().items()}
    for t in full.values():
        t.normal_()
    args.save(tmp_path / "config.json")
    save_file(full, tmp_path / "model.safetensors")
    I = args.intermediate_size  # 60: 20 channels a rank; head_dim 8: 2 query heads and 1 kv head a rank
    for rank in range(3):
        loaded_args, shard = load_checkpoint(tmp_path, "cpu", torch.float32, rank, 3)
        assert loaded_args == args
        for name, tensor in full.items():
            q, kv = slice(16 * rank, 16 * rank + 16), slice(8 * rank, 8 * rank + 8)
            if name.endswith("wqkv.weight") or name.endswith("wqkv.bias"):
                want = torch.cat([tensor[q], tensor[48 : 48 + 24][kv], tensor[72:][kv]])
            elif name.endswith("w13.weight"):
                want = torch.cat([tensor[: I][20 * rank : 20 * rank + 20], tensor[I:][20 * rank : 20 * rank + 20]])
            elif name.endswith("wo.weight"):
                want = tensor[:, q]
            elif name.endswith("w2.weight"):
                want = tensor[:, 20 * rank : 20 * rank + 20]
            else:
                want = tensor
            assert torch.equal(shard[name], want), name
        local = build_model(args, shard, torch.device("cpu"), torch.float32, world=3)
        assert (local.args.n_heads, local.args.n_kv_heads, local.args.intermediate_size) == (2, 1, 20)
