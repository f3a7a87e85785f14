"""Generate text with a static KV cache (fp16 or KIVI).

    python generate.py [--checkpoint NAME|PATH] [--kv fp16|kivi2|kivi4|k4v2 ...] [--prompt TEXT]

Each sequence of the batch owns one cache slot. Prompts are prefilled (in full precision,
one forward per prompt length), then every decode step feeds one token per slot at that
slot's own position. On CUDA the decode step is compiled with
torch.compile(mode="reduce-overhead", fullgraph=True): one CUDA graph per batch size.
Sampling runs on the device; the host looks at the tokens only every `SYNC_EVERY` steps
(to stop once every sequence has ended).
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kivi_cache import CacheConfig, parse_kv_mode
from model import Transformer
from planner import PREFILL_TOKENS, cache_slot_bytes, device_budget, max_batch_size

SYNC_EVERY = 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 200, "top_p": 1.0}


@dataclass
class Sampling:
    temperature: float | Tensor = 0.0  # 0: greedy; or a tensor [B, 1] of per-row temperatures, all > 0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample(logits: Tensor, s: Sampling) -> Tensor:
    """logits [B, V] float32 -> next tokens [B], without a host sync."""
    if not isinstance(s.temperature, Tensor) and s.temperature == 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    # Exponential race: argmax(p / E), E ~ Exp(1), samples from p without a sync.
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def decode_step(model: Transformer, tokens: Tensor, input_pos: Tensor, s: Sampling) -> Tensor:
    """tokens [B, 1] at positions input_pos [B] -> next tokens [B]."""
    return sample(model(tokens, input_pos=input_pos)[:, -1], s)


def setup_caches(model: Transformer, cache: CacheConfig, batch_size: int, max_seq_len: int) -> None:
    """Give the model caches for batch_size slots of max_seq_len tokens, reusing the
    current ones when they are the same (a compiled step keeps its CUDA graph)."""
    if getattr(model, "cache_setup", None) == (cache, batch_size, max_seq_len):
        return
    model.cache_setup = (cache, batch_size, max_seq_len)
    a, p = model.args, model.tok_embeddings.weight
    model.set_caches(lambda: cache.make(batch_size, a.n_kv_heads, a.head_dim, max_seq_len, p.dtype, p.device,
                                        a.sliding_window))


def prefill(model: Transformer, prompts: list[list[int]], slots: list[int], s: Sampling) -> Tensor:
    """Prefill each prompt into its slot (prompts of one length together, PREFILL_TOKENS
    at most a forward); returns the first sampled token of each [len(prompts)]."""
    device = model.tok_embeddings.weight.device
    first = torch.empty(len(prompts), dtype=torch.long, device=device)
    for length in sorted({len(p) for p in prompts}):
        same = [i for i, p in enumerate(prompts) if len(p) == length]
        per_forward = max(1, PREFILL_TOKENS // length)
        for j in range(0, len(same), per_forward):
            idx = same[j : j + per_forward]
            tokens = torch.tensor([prompts[i] for i in idx], device=device)
            slot_idx = torch.tensor([slots[i] for i in idx], device=device)
            logits = model(tokens, slots=slot_idx, last_only=True)[:, -1]
            first[torch.tensor(idx, device=device)] = sample(logits, s)
    return first


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
             cache: CacheConfig, eos_ids: set[int] = frozenset(), step=decode_step,
             max_seq_len: int | None = None) -> tuple[list[list[int]], dict]:
    """Generate up to max_new_tokens after each prompt (one cache slot each), stopping a
    sequence at an EOS token (kept in the output). Returns the new tokens per prompt and
    timings. `step` is decode_step, or its compiled version. The caches hold max_seq_len
    tokens a slot (default: just enough); a caller reusing them, and so the step's CUDA
    graph, across calls passes the same value."""
    device = model.tok_embeddings.weight.device
    B = len(prompts)
    max_seq_len = max_seq_len or max(len(p) for p in prompts) + max_new_tokens
    setup_caches(model, cache, B, max_seq_len)
    sync(device)
    t0 = time.perf_counter()
    tokens = prefill(model, prompts, list(range(B)), sampling)  # [B]
    sync(device)
    t_prefill = time.perf_counter() - t0
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    out[:, 0] = tokens
    input_pos = torch.tensor([len(p) for p in prompts], device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    done = torch.isin(tokens, eos)
    # The step's input is one [B, 1] buffer: the same shape, strides and address every step
    # and every call (a view into `out` would change strides with max_new_tokens: a recompile).
    step_input = tokens[:, None].clone()
    n_steps = 1
    t0 = time.perf_counter()
    while n_steps < max_new_tokens:
        tokens = step(model, step_input, input_pos, sampling)
        out[:, n_steps] = tokens
        step_input.copy_(tokens[:, None])
        done |= torch.isin(tokens, eos)
        input_pos += 1
        n_steps += 1
        if n_steps % SYNC_EVERY == 0 and bool(done.all()):
            break
    sync(device)
    t_decode = time.perf_counter() - t0
    results = []
    for row in out[:, :n_steps].tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        results.append(row[: ends[0] + 1] if ends else row)
    stats = {"prefill_s": t_prefill, "decode_s": t_decode, "decode_steps": n_steps - 1,
             "decode_tokens_per_s": B * (n_steps - 1) / max(t_decode, 1e-9)}
    return results, stats


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The options every command shares: KIVI settings, device and dtype."""
    p.add_argument("--group-size", type=int, default=32, help="KIVI quantization group G")
    p.add_argument("--residual-length", type=int, default=128, help="full-precision ring R")
    p.add_argument("--sink-tokens", type=int, default=0, help="first tokens kept in full precision")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")


def runtime(args: argparse.Namespace, kv_modes: str) -> tuple[list[CacheConfig], torch.device, torch.dtype]:
    """The cache configs of a comma-separated --kv value, and the device and dtype."""
    modes = [m.strip() for m in kv_modes.split(",") if m.strip()]
    if not modes:
        raise ValueError("--kv names no mode")
    for mode in modes:
        parse_kv_mode(mode)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    return [CacheConfig(m, args.group_size, args.residual_length, args.sink_tokens) for m in modes], device, dtype


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Generation options shared by generate.py and batch generation."""
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, help="0: greedy (default: generation_config.json's, else 0.8)")
    p.add_argument("--top-k", type=int, help="0: off (default: generation_config.json's, else 200)")
    p.add_argument("--top-p", type=float, help="1: off (default: generation_config.json's, else 1)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step (default: on for CUDA, off for CPU)")


def load_generation_config(checkpoint_dir: Path) -> dict:
    """The checkpoint's generation_config.json, {} where it has none."""
    path = Path(checkpoint_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def sampling_from(args: argparse.Namespace, generation_config: dict | None = None) -> Sampling:
    """The checked sampling options of add_sampling_args. An option left out on the command line
    takes generation_config's value (do_sample false: greedy), else SAMPLING_DEFAULTS'."""
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    config = generation_config or {}
    values = {k: config[k] if config.get(k) is not None else v for k, v in SAMPLING_DEFAULTS.items()}
    if config.get("do_sample") is False:
        values["temperature"] = 0.0
    values |= {k: getattr(args, k) for k in values if getattr(args, k) is not None}
    sampling = Sampling(**values)
    sampling.check()
    return sampling


def compiled_if_asked(step: Callable, args: argparse.Namespace, device: torch.device) -> Callable:
    """The step compiled into CUDA graphs when --compile says so (default: on CUDA)."""
    if args.compile if args.compile is not None else device.type == "cuda":
        return torch.compile(step, mode="reduce-overhead", fullgraph=True)
    return step


def run_cli(main: Callable[[], None]) -> None:
    """Run a command's main: an expected failure prints one line and exits 1."""
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a name under checkpoints/ or a path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--kv", default="fp16", help="cache mode: fp16, kivi2, kivi4, k{2,4}v{2,4}")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="The key to a good night's sleep is")
    prompt.add_argument("--prompt-file", type=Path)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--batch-size", type=parse_batch_size, default=1, help="a number, or auto: the largest that fits")
    add_sampling_args(p)
    add_runtime_args(p)
    return p.parse_args(argv)


def parse_batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got '{value}'")
    return int(value)


def plan_batch_size(requested: int | str, model_args, cache: CacheConfig, seq_len: int,
                    device: torch.device, dtype: torch.dtype) -> int:
    """The batch to run: 'auto' asks the planner for the largest that fits; a number is
    checked against the planner so that one that cannot fit fails before anything runs."""
    fits = max_batch_size(model_args, cache, seq_len, dtype, device_budget(device))
    if requested == "auto":
        if fits < 1:
            raise ValueError(f"not even one sequence of {seq_len} tokens fits with the {cache.kv} cache")
        return fits
    if requested > fits:
        raise ValueError(f"--batch-size {requested} at {seq_len} tokens does not fit with the {cache.kv} cache "
                         f"(the planner allows at most {fits}; try --batch-size auto)")
    return requested


def main(argv: list[str] | None = None) -> None:
    from checkpoint import load_checkpoint, resolve_checkpoint
    from model import build_model
    from tokenizer import load_tokenizer

    args = parse_args(argv)
    (cache,), device, dtype = runtime(args, args.kv)
    text = args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else args.prompt
    if not text.strip():
        raise ValueError("the prompt is empty")

    path = resolve_checkpoint(args.checkpoint)
    sampling = sampling_from(args, load_generation_config(path))
    model_args, state_dict = load_checkpoint(path, device, dtype)
    tokenizer = load_tokenizer(path)
    cache.check(model_args.head_dim)
    if args.chat:
        prompt = tokenizer.encode_chat([{"role": "user", "content": text}])
    else:
        prompt = tokenizer.encode(text, bos=tokenizer.add_bos)
    total = len(prompt) + args.max_new_tokens
    if total > model_args.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)} tokens) + --max-new-tokens {args.max_new_tokens} = {total} "
                         f"exceeds the model's context of {model_args.max_seq_len} tokens")
    batch_size = plan_batch_size(args.batch_size, model_args, cache, total, device, dtype)
    model = build_model(model_args, state_dict, device, dtype)
    del state_dict

    torch.manual_seed(args.seed)
    step = compiled_if_asked(decode_step, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outputs, stats = generate(model, [prompt] * batch_size, args.max_new_tokens, sampling, cache,
                              tokenizer.eos_ids, step)
    for i, new in enumerate(outputs):
        if batch_size > 1:
            print(f"--- sequence {i}")
        print(text + tokenizer.decode([t for t in new if t not in tokenizer.eos_ids]))
    kv = cache_slot_bytes(model_args, cache, total, dtype)
    fp = cache_slot_bytes(model_args, CacheConfig("fp16"), total, dtype)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    log(f"\nprefill: {stats['prefill_s'] * 1000:.1f} ms for {batch_size} x {len(prompt)} tokens")
    log(f"decode: {stats['decode_tokens_per_s']:.1f} tokens/s ({stats['decode_steps']} steps, batch {batch_size})")
    log(f"kv cache ({cache.kv}): {batch_size * kv / 1e6:.2f} MB for {batch_size} x {total} tokens, "
        f"{kv / total:.0f} B/token, {kv / fp:.3f}x the size of an fp16 cache ({fp / total:.0f} B/token)")
    if device.type == "cuda":
        log(f"peak memory: {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB")


if __name__ == "__main__":
    run_cli(main)
