"""GPU check of the compiled KIVI decode step (needs CUDA; one command):

    python scripts/check_gpu.py [--steps 1000] [--skip-kernel-tests]

First the kernel tests (tests/test_kernels.py: the tensor-core kernels run only on a GPU;
tests/test_pointwise.py: the prefill's elementwise kernels, bfloat16 only on a GPU).
Then, for each model and cache mode, a random-weight model decodes a batch of prompts of
different lengths for --steps greedy steps with the step compiled by
torch.compile(mode="reduce-overhead", fullgraph=True), across many flushes. It asserts:
  - zero graph breaks, zero recompilations and no CUDA-graph skips after warm-up;
  - the same tokens, fed to the eager pure-PyTorch reference path (a float32 CPU copy of the
    model with the reference cache ops), give logits matching the GPU's within the model
    dtype's tolerance, and every GPU token is the reference's argmax, except where the
    reference's top two logits are closer than that tolerance (near-ties, counted).
float32 models take the plain Triton kernels, float16 ones the tensor-core path (random
untied output layers give logits of about unit size, so the tolerances are comparable); the
windowed models decode far past their window (prompts up to 301 tokens, --steps more).
Last, sampled generation through engine.LLM with the compiled step, in each filter mode at a
small and a large batch over a 32000-token vocabulary (Inductor generates other scan and sort
code for each), must give the eager step's tokens.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch._dynamo.utils

from engine import LLM, prefill, setup_caches
from kivi_cache import CacheConfig
from model import ModelArgs, Transformer, build_model

SHAPES = {  # small models of the two head sizes the kernels serve, two with a sliding window: (args, dtype)
    "gqa-d64": (ModelArgs(dim=576, n_layers=4, n_heads=9, n_kv_heads=3, intermediate_size=1536, vocab_size=4096,
                          max_seq_len=4096), torch.float32),
    "mha-d128-swa": (ModelArgs(dim=1024, n_layers=3, n_heads=8, n_kv_heads=8, intermediate_size=2048,
                               vocab_size=4096, max_seq_len=4096, sliding_window=600), torch.float32),
    "gqa-32/8-d128-swa": (ModelArgs(dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, intermediate_size=2048,
                                    vocab_size=4096, max_seq_len=4096, sliding_window=700), torch.float16),
    "mqa-71/1-d64": (ModelArgs(dim=4544, n_layers=1, n_heads=71, n_kv_heads=1, intermediate_size=2048,
                               vocab_size=4096, max_seq_len=4096), torch.float16),
}

MODES = {"gqa-d64": (("kivi2", 0), ("k4v2", 4), ("fp16", 0)), "mha-d128-swa": (("kivi2", 0), ("kivi4", 0)),
         "gqa-32/8-d128-swa": (("kivi2", 4), ("kivi4", 0), ("fp16", 0)), "mqa-71/1-d64": (("kivi2", 4), ("k4v2", 0))}
TOLERANCE = {torch.float32: 1e-2, torch.float16: 1e-2}  # max |logit difference|; fp16 also the near-tie gap


def compile_counts() -> dict[str, int]:
    c = torch._dynamo.utils.counters
    return {"graph_breaks": sum(c["graph_break"].values()), "frames": c["stats"]["unique_graphs"],
            "cudagraph_skips": c["inductor"]["cudagraph_skips"]}


@torch.inference_mode()
def decode_compiled(model: Transformer, cache: CacheConfig, prompts: list[list[int]], steps: int, step) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Greedy decode `steps` tokens; returns tokens [B, steps + 1] (the first from prefill),
    logits [steps, B, V] of the decode steps, and the compile counters after warm-up."""
    B = len(prompts)
    setup_caches(model, cache, B, max(map(len, prompts)) + steps + 1)
    tokens = torch.empty(B, steps + 1, dtype=torch.long, device="cuda")
    tokens[:, 0] = prefill(model, prompts, list(range(B))).argmax(-1)
    input_pos = torch.tensor([len(p) for p in prompts], device="cuda")
    all_logits = []
    after_warmup = None
    for i in range(steps):
        logits = step(model, tokens[:, i : i + 1], input_pos)
        all_logits.append(logits.clone())
        tokens[:, i + 1] = logits.argmax(-1)
        input_pos += 1
        if i == 3:
            after_warmup = compile_counts()
    return tokens, torch.stack(all_logits), after_warmup


@torch.inference_mode()
def reference_logits(model: Transformer, cache: CacheConfig, prompts: list[list[int]], tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced eager decode of the same tokens on the CPU reference path."""
    B, n = tokens.shape
    setup_caches(model, cache, B, max(map(len, prompts)) + n)
    prefill(model, prompts, list(range(B)))
    input_pos = torch.tensor([len(p) for p in prompts])
    out = []
    for i in range(n - 1):
        out.append(model(tokens[:, i : i + 1], input_pos=input_pos)[:, -1])
        input_pos += 1
    return torch.stack(out)


SAMPLING = {"none": dict(temperature=1.0, top_k=0), "top_k": dict(temperature=0.8, top_k=50),
            "sort": dict(temperature=0.8, top_k=200, top_p=0.9)}


def check_sampling() -> list[str]:
    """Seeded sampled completions, compiled step against eager, float32 (no near-ties to speak
    of); returns the failing cases."""
    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=512, vocab_size=32000,
                     max_seq_len=512)
    model = build_model(args, None, torch.device("cuda"), torch.float32)
    gen = torch.Generator().manual_seed(2)
    failures = []
    for batch in (8, 300):
        requests = [{"prompt": torch.randint(0, args.vocab_size, (int(n),), generator=gen).tolist()}
                    for n in torch.randint(5, 60, (batch,), generator=gen)]
        for mode, sampling in SAMPLING.items():
            torch._dynamo.reset()
            runs = [LLM.from_model(model, cache=CacheConfig("kivi2"), batch_size=batch, compile=c).generate(
                requests, max_new_tokens=16, seed=3, **sampling) for c in (True, False)]
            same = sum(a.token_ids == b.token_ids for a, b in zip(*runs)) / batch
            ok = same >= 0.95
            print(f"sampling {mode:6} batch {batch:3}: compiled tokens equal eager in {same:.1%} of completions "
                  f"{'OK' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"sampling {mode} batch {batch}")
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--skip-kernel-tests", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: check_gpu.py needs a CUDA device")
    if not args.skip_kernel_tests:
        import pytest

        kernel_tests = [str(ROOT / "tests" / name) for name in ("test_kernels.py", "test_pointwise.py")]
        if pytest.main(["-q", "-p", "no:cacheprovider", *kernel_tests]) != 0:
            sys.exit("error: kernel tests failed on the GPU")

    def logits_step(model, tokens, input_pos):
        return model(tokens, input_pos=input_pos)[:, -1]

    failures = []
    for shape_name, (model_args, dtype) in SHAPES.items():
        torch.manual_seed(0)
        gpu_model = build_model(model_args, None, torch.device("cuda"), dtype)
        cpu_model = build_model(model_args, {k: v.float().cpu() for k, v in gpu_model.state_dict().items()},
                                torch.device("cpu"), torch.float32)
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, model_args.vocab_size, (n,), generator=gen).tolist() for n in (1, 37, 130, 301)]
        for mode, n_sink in MODES[shape_name]:
            cache = CacheConfig(mode, 32, 128, n_sink)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            step = torch.compile(logits_step, mode="reduce-overhead", fullgraph=True)
            tokens, gpu_logits, warm = decode_compiled(gpu_model, cache, prompts, args.steps, step)
            final = compile_counts()
            ref = reference_logits(cpu_model, cache, prompts, tokens.cpu())
            gpu_logits = gpu_logits.cpu()
            err = (gpu_logits - ref).abs().max().item()
            top2 = ref.topk(2, dim=-1).values
            tol = TOLERANCE[dtype]
            tie = (top2[..., 0] - top2[..., 1]) < (1e-3 if dtype == torch.float32 else tol)
            mismatch = ((gpu_logits.argmax(-1) != ref.argmax(-1)) & ~tie).sum().item()
            ok = final == warm and final["graph_breaks"] == 0 and final["cudagraph_skips"] == 0 and mismatch == 0 and err < tol
            print(f"{shape_name:17} {mode:6} sinks {n_sink}: steps {args.steps}, max |logit diff| {err:.2e}, "
                  f"token mismatches {mismatch}, near-ties {tie.sum().item()}, counters warm {warm} final {final} "
                  f"{'OK' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{shape_name} {mode}")
    failures += check_sampling()
    if failures:
        sys.exit(f"error: GPU check failed for {', '.join(failures)}")
    print("GPU check passed")


if __name__ == "__main__":
    main()
