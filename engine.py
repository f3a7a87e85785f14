"""kivi-fast as a library: load a model once, then generate for many requests.

    from engine import LLM
    llm = LLM(kv="kivi2")  # the embedded SmolLM2-135M-Instruct unless checkpoint= names another
    for c in llm.generate(["The capital of France is", [{"role": "user", "content": "Name a color."}]],
                          max_new_tokens=32, temperature=0):
        print(c.text)

A request is a string (a prompt), a list of chat messages (rendered with the checkpoint's
chat template), or a dict with "prompt" (a string or a list of token ids) or "messages", and
any of the SamplingParams fields, which override the call's keyword arguments, which override
the checkpoint's generation_config.json, which overrides SamplingParams' defaults.

Requests run with continuous batching in a static cache of `batch_size` slots: when a
sequence ends, the next prompt is prefilled into its slot while the others keep decoding.
The decode step always runs on all slots (on CUDA compiled into one CUDA graph) with the
sampling parameters of each slot in device tensors; the host reads the tokens every
`sync_every` steps, so a slot may run a few steps past its end (those tokens are dropped).
Sampling noise is a hash of (seed, choice, position, token id): a seeded request gives the
same tokens whatever its batch-mates, the batch size and the slot it lands in.
"""

import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from kivi_cache import CacheConfig, PackedPrompts, parse_kv_mode
from model import CONFIGS, ModelArgs, Transformer, build_model
from planner import PREFILL_TOKENS, device_budget, max_batch_size
import tp
from tokenizer import Tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SYNC_EVERY = 16
MAX_N = 64  # choices a request may ask for
TOP_K_CAP = 256  # top-k up to this runs on torch.topk; a larger one, or top-p, sorts the vocabulary


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0: greedy
    top_k: int = 200  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: drawn from torch's global generator when the call starts
    stop: tuple[str, ...] = ()  # strings that end the completion (not part of its text)
    n: int = 1  # completions of the request
    logprobs: bool = False  # return each completion token's log-probability under the model

    def check(self) -> "SamplingParams":
        """self, or one ValueError naming the first bad field."""
        def number(name: str, value, kind: type, ok: Callable, what: str) -> None:
            if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not ok(value):
                raise ValueError(f"{name} must be {what}, got {value!r}")

        number("max_new_tokens", self.max_new_tokens, int, lambda x: x >= 1, "an integer >= 1")
        number("temperature", self.temperature, int | float, lambda x: x >= 0, "a finite number >= 0")
        number("top_k", self.top_k, int, lambda x: x >= 0, "an integer >= 0")
        number("top_p", self.top_p, int | float, lambda x: 0 < x <= 1, "a number in (0, 1]")
        if self.seed is not None:
            number("seed", self.seed, int, lambda x: 0 <= x < 2**63, "an integer in [0, 2^63)")
        number("n", self.n, int, lambda x: 1 <= x <= MAX_N, f"an integer in [1, {MAX_N}]")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be true or false, got {self.logprobs!r}")
        return self

    def update(self, values: dict) -> "SamplingParams":
        """A copy with `values` (field name -> value; stop may be one string), checked."""
        unknown = sorted(set(values) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown sampling field {unknown[0]!r}")
        values = dict(values)
        if "stop" in values:
            stop = values["stop"]
            values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list | tuple) else stop
        return replace(self, **values).check()

    @classmethod
    def from_generation_config(cls, config: dict) -> "SamplingParams":
        """The defaults with generation_config.json's temperature, top_k and top_p (do_sample
        false: greedy)."""
        values = {k: config[k] for k in ("temperature", "top_k", "top_p") if config.get(k) is not None}
        if config.get("do_sample") is False:
            values["temperature"] = 0.0
        return cls().update(values)


@dataclass
class Completion:
    request: int  # the request's index in the call
    choice: int  # 0 .. n - 1
    text: str | None  # None when the model has no tokenizer
    token_ids: list[int]  # the completion's tokens: no EOS; with a stop string, up to the token completing it
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the one that ended the completion included
    logprobs: list[float] | None = None  # of each of token_ids, when asked


@dataclass
class _Job:
    request: int
    choice: int
    prompt: list[int]
    params: SamplingParams
    seed: int  # of this choice
    resume: int = 0  # leading prompt tokens the (one) slot already holds: Chat's later turns
    tokens: list[int] = field(default_factory=list)  # generated so far (may run past the end)
    logprobs: list[float] = field(default_factory=list)
    checked: int = 0  # leading tokens whose text holds no stop string


# ---- loading


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device is available")
    if name not in ("cuda", "cpu"):
        raise ValueError(f"unknown device {name!r}: use auto, cuda or cpu")
    return torch.device(name)


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is not None and name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use {', '.join(DTYPES)}")
    return DTYPES[name or ("bf16" if device.type == "cuda" else "fp32")]


def load_model(checkpoint: str | None, device: torch.device, dtype: torch.dtype,
               random_weights: bool = False) -> tuple[Transformer, Tokenizer | None, dict]:
    """The one way the project loads a model: (model, tokenizer, generation_config). With
    random_weights, `checkpoint` names a shape (model.CONFIGS, or a folder whose config.json
    gives one) and there is no tokenizer: speed does not depend on the weights' values.
    Under torchrun (tp.py) each rank loads and builds its own part."""
    rank, world = tp.rank(), tp.world_size()
    from checkpoint import load_checkpoint, resolve_checkpoint
    from tokenizer import load_tokenizer

    if random_weights:
        if checkpoint is None:
            raise ValueError("random weights need a checkpoint: a model shape name or a folder with config.json")
        shape = ModelArgs.from_name(checkpoint) if checkpoint.lower() in CONFIGS else ModelArgs.load(Path(checkpoint) / "config.json")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's seed stays
            torch.manual_seed(0)
            return build_model(shape, None, device, dtype, world), None, {}
    path = resolve_checkpoint(checkpoint)
    tokenizer = load_tokenizer(path)
    args, state_dict = load_checkpoint(path, device, dtype, rank, world)
    return build_model(args, state_dict, device, dtype, world), tokenizer, load_generation_config(path)


def load_generation_config(checkpoint_dir: Path) -> dict:
    """The checkpoint's generation_config.json, {} where it has none."""
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    return config if isinstance(config, dict) else {}


# ---- sampling on the device


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash of int64 x holding values below 2^32 (products stay below 2^63)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def uniform_noise(seed: Tensor, position: Tensor, vocab_size: int) -> Tensor:
    """seed, position [B] int64 -> [B, vocab_size] uniform in (0, 1), a function of (seed,
    position, token id) only: counter-based, no generator state."""
    row = _hash32(_hash32(_hash32(seed & 0xFFFFFFFF) ^ (seed >> 32)) ^ (position & 0xFFFFFFFF))  # [B]
    # the token index only meets int64 tensors in bitwise ops: Inductor computes index
    # arithmetic (an arange times a constant) in int32 on CUDA
    token = torch.arange(vocab_size, device=seed.device)
    bits = _hash32(_hash32(row[:, None] ^ token))  # [B, V]
    return ((bits >> 8).float() + 0.5) * 2.0**-24


@torch.library.custom_op("kivi::prefix_sum", mutates_args=())
def prefix_sum(x: Tensor) -> Tensor:
    """x.cumsum(-1), opaque to Inductor: for a vocabulary-long cumsum over a few rows it picks a
    split scan, whose CUDA code generation fails in torch 2.11."""
    return x.cumsum(-1)


@prefix_sum.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _filter(x: Tensor, top_k: Tensor, top_p: Tensor, mode: str) -> Tensor:
    """Mask all but each row's top_k [B] logits (0: all) and its top_p [B] nucleus (1: all).
    mode "top_k": every top_k <= TOP_K_CAP and no top_p, so torch.topk suffices; "sort"."""
    off = float("-inf")
    if mode == "top_k":
        top = x.topk(min(TOP_K_CAP, x.shape[-1]), dim=-1).values
        kth = top.gather(1, (top_k[:, None] - 1).clamp(0, top.shape[-1] - 1))  # top_k past the vocabulary: all
        return x.masked_fill((top_k[:, None] > 0) & (x < kth), off)
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(-1)
    rank = torch.arange(x.shape[-1], device=x.device)
    nucleus = (top_p[:, None] < 1) & (prefix_sum(probs) - probs > top_p[:, None])  # top_p 1: no rounding cut
    drop = nucleus | ((top_k[:, None] > 0) & (rank >= top_k[:, None]))
    return x.scatter(-1, order, sorted_x.masked_fill(drop, off))


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor, position: Tensor,
           mode: str) -> tuple[Tensor, Tensor]:
    """logits [B, V] float32 and per-row parameters [B] -> (tokens [B], the model's
    log-probability of each [B]), without a host sync. temperature 0: greedy. Sampling is
    the Gumbel-max race argmax(logits / T + g) with g from uniform_noise; mode "greedy" (no
    row samples), "none" (no row filters), "top_k" or "sort" (_filter)."""
    logprobs = logits.log_softmax(-1)
    if mode == "greedy":
        tokens = logits.argmax(-1)
        return tokens, logprobs.gather(1, tokens[:, None])[:, 0]
    hot = temperature > 0
    x = logits / torch.where(hot, temperature, 1.0)[:, None]
    if mode != "none":
        x = _filter(x, top_k, top_p, mode)
    gumbel = -torch.log(-torch.log(uniform_noise(seed, position, logits.shape[-1])))
    tokens = torch.where(hot, (x + gumbel).argmax(-1), logits.argmax(-1))
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def filter_mode(params: list[SamplingParams]) -> str:
    """The cheapest sample() mode serving every row's parameters (greedy rows need none)."""
    hot = [p for p in params if p.temperature > 0]
    if not hot:
        return "greedy"
    if any(p.top_p < 1 or p.top_k > TOP_K_CAP for p in hot):
        return "sort"
    return "top_k" if any(p.top_k > 0 for p in hot) else "none"


def decode_step(model: Transformer, tokens: Tensor, input_pos: Tensor, temperature: Tensor, top_k: Tensor,
                top_p: Tensor, seed: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """tokens [B, 1] at positions input_pos [B] -> (next tokens [B], their log-probabilities [B])."""
    return sample(model(tokens, input_pos=input_pos)[:, -1], temperature, top_k, top_p, seed, input_pos, mode)


def compiled(step: Callable, device: torch.device, compile: bool | None) -> Callable:
    """The step compiled into CUDA graphs when `compile` says so (None: on CUDA only)."""
    if compile if compile is not None else device.type == "cuda":
        return torch.compile(step, mode="reduce-overhead", fullgraph=True)
    return step


# ---- caches, prefill and the scheduler


def setup_caches(model: Transformer, cache: CacheConfig, batch_size: int, max_seq_len: int) -> None:
    """Give the model caches for batch_size slots of max_seq_len tokens, reusing the
    current ones when they are the same (a compiled step keeps its CUDA graph)."""
    if getattr(model, "cache_setup", None) == (cache, batch_size, max_seq_len):
        return
    model.cache_setup = (cache, batch_size, max_seq_len)
    a, p = model.args, model.tok_embeddings.weight
    model.set_caches(lambda: cache.make(batch_size, a.n_kv_heads, a.head_dim, max_seq_len, p.dtype, p.device,
                                        a.sliding_window))


def prefill(model: Transformer, prompts: list[list[int]], slots: list[int]) -> Tensor:
    """Prefill each prompt into its slot, prompts of any lengths packed together, up to
    PREFILL_TOKENS tokens a forward (a longer prompt alone); returns each prompt's last logits
    [len(prompts), V] float32."""
    device = model.tok_embeddings.weight.device
    last = []
    start = 0
    while start < len(prompts):
        end, n_tokens = start + 1, len(prompts[start])
        while end < len(prompts) and n_tokens + len(prompts[end]) <= PREFILL_TOKENS:
            n_tokens += len(prompts[end])
            end += 1
        tokens = torch.tensor([[t for p in prompts[start:end] for t in p]], device=device)  # [1, n_tokens]
        packed = PackedPrompts(slots[start:end], [len(p) for p in prompts[start:end]], device)
        last.append(model(tokens, prompts=packed, last_only=True)[0])
        start = end
    return torch.cat(last)


def plan_batch_size(requested: int | str, model_args: ModelArgs, cache: CacheConfig, seq_len: int,
                    device: torch.device, dtype: torch.dtype) -> int:
    """The batch to run: 'auto' asks the planner for the largest that fits; a number is
    checked against the planner so that one that cannot fit fails before anything runs."""
    fits = max_batch_size(model_args, cache, seq_len, dtype, device_budget(device))
    if requested == "auto":
        if fits < 1:
            raise ValueError(f"not even one sequence of {seq_len} tokens fits with the {cache.kv} cache")
        return fits
    if requested > fits:
        raise ValueError(f"batch size {requested} at {seq_len} tokens does not fit with the {cache.kv} cache "
                         f"(the planner allows at most {fits}; try batch size auto)")
    return requested


def _finish(job: _Job, tokenizer: Tokenizer | None, eos_ids: set[int]) -> Completion | None:
    """The job's completion if it has ended (EOS, a stop string, max_new_tokens), else None."""
    ids = job.tokens[: job.params.max_new_tokens]
    eos = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    end, n_tokens = (len(ids), len(ids)) if eos is None else (eos, eos + 1)
    reason = "stop" if eos is not None else "length" if len(ids) == job.params.max_new_tokens else None
    text = None
    if tokenizer is not None and (reason is not None or job.params.stop):
        text = tokenizer.decode(ids[:end])
        if cuts := [i for i in map(text.find, job.params.stop) if i >= 0]:
            n_tokens = next(n for n in range(job.checked + 1, end + 1)
                            if any(s in tokenizer.decode(ids[:n]) for s in job.params.stop))
            text, reason, end = text[: min(cuts)], "stop", n_tokens
        job.checked = end
    if reason is None:
        return None
    logprobs = job.logprobs[:end] if job.params.logprobs else None
    return Completion(job.request, job.choice, text, ids[:end], reason, len(job.prompt), n_tokens, logprobs)


@torch.inference_mode()
def run_jobs(model: Transformer, tokenizer: Tokenizer | None, jobs: list[_Job], batch_size: int, max_seq_len: int,
             cache: CacheConfig, step: Callable, eos_ids: set[int], stats: dict, refill: bool = True,
             sync_every: int = SYNC_EVERY, on_window: Callable[[list[_Job]], None] | None = None,
             warmup: bool = True) -> Iterator[Completion]:
    """Run the jobs in batch_size cache slots, yielding each completion as it ends. A slot is
    refilled as soon as it is free, or (refill False) once every slot is free. A job with
    `resume` tokens already in the slot (a run of one slot only) feeds the rest of its prompt
    through decode steps instead of a prefill. on_window(jobs)
    sees the running jobs after each window of sync_every steps. stats["prefill_s"],
    stats["decode_s"] and stats["decode_steps"] accumulate the time of the prefills and of the
    decode windows (steps until their tokens reach the host); stats["warmup_s"] is the
    compilation and capture of the step (warmup: a compiled step) before the first prompt."""
    device = model.tok_embeddings.weight.device
    B, K = batch_size, sync_every
    if B > 1 and any(job.resume for job in jobs):
        raise ValueError("a job resuming a slot's contents runs in a batch of one")
    setup_caches(model, cache, B, max_seq_len)
    window = torch.zeros(B, K + 1, dtype=torch.long, device=device)  # column 0: each slot's next input
    window_logprobs = torch.zeros(B, K + 1, device=device)
    input_pos = torch.zeros(B, dtype=torch.long, device=device)
    temperature, top_p = torch.zeros(B, device=device), torch.ones(B, device=device)
    top_k, seed = (torch.zeros(B, dtype=torch.long, device=device) for _ in range(2))
    slots: list[_Job | None] = [None] * B
    pending = deque(jobs)
    t0 = time.perf_counter()
    for mode in sorted({filter_mode([job.params]) for job in jobs}) if warmup else ():  # every mode the jobs need
        for _ in range(3):
            step(model, window[:, :1], input_pos, temperature, top_k, top_p, seed, mode)
    _sync(device)
    stats["warmup_s"] = stats.get("warmup_s", 0.0) + time.perf_counter() - t0
    while pending or any(job is not None for job in slots):
        fresh = []  # slots prefilled in this round
        t0 = time.perf_counter()  # the device is idle here: the last window ended with its tokens read
        if refill or all(job is None for job in slots):
            for b in range(B):
                if slots[b] is None and pending:
                    job = slots[b] = pending.popleft()
                    p = job.params
                    temperature[b], top_k[b], top_p[b], seed[b] = p.temperature, p.top_k, p.top_p, job.seed
                    if job.resume:  # the rest of the prompt but its last token, then that token as the next input
                        for pos in range(job.resume, len(job.prompt) - 1):
                            window[b, 0], input_pos[b] = job.prompt[pos], pos
                            step(model, window[:, :1], input_pos, temperature, top_k, top_p, seed, "greedy")
                        window[b, 0], input_pos[b] = job.prompt[-1], len(job.prompt) - 1
                    else:
                        fresh.append(b)
        if fresh:  # one prefill for every new prompt, then their first tokens, each from its own logits
            logits = prefill(model, [slots[b].prompt for b in fresh], fresh)
            rows = torch.tensor(fresh, device=device)
            last_pos = torch.tensor([len(slots[b].prompt) - 1 for b in fresh], device=device)
            first, logprob = sample(logits, temperature[rows], top_k[rows], top_p[rows], seed[rows], last_pos,
                                    filter_mode([slots[b].params for b in fresh]))
            window[rows, 0], window_logprobs[rows, 0] = first, logprob
            input_pos[rows] = last_pos + 1
        _sync(device)
        t1 = time.perf_counter()
        stats["prefill_s"] = stats.get("prefill_s", 0.0) + t1 - t0
        if idle := [b for b in range(B) if slots[b] is None]:
            input_pos[idle] = 0  # idle slots run at the cheapest valid position; their output is ignored
        running = [(b, job) for b, job in enumerate(slots) if job is not None]
        mode = filter_mode([job.params for _, job in running])
        # no more steps than the longest-running job still needs
        steps = min(K, max(job.params.max_new_tokens - len(job.tokens) - (b in fresh) for b, job in running))
        for k in range(steps):
            window[:, k + 1], window_logprobs[:, k + 1] = step(model, window[:, k : k + 1], input_pos, temperature,
                                                               top_k, top_p, seed, mode)
            input_pos.add_(1).clamp_(max=max_seq_len - 1)  # a slot past its end stays inside the cache
        new, new_logprobs = window[:, : steps + 1].tolist(), window_logprobs[:, : steps + 1].tolist()
        stats["decode_s"] = stats.get("decode_s", 0.0) + time.perf_counter() - t1
        stats["decode_steps"] = stats.get("decode_steps", 0) + steps
        window[:, 0] = window[:, steps]
        for b, job in enumerate(slots):
            if job is None:
                continue
            first = 0 if b in fresh else 1
            job.tokens += new[b][first:]
            job.logprobs += new_logprobs[b][first:]
        if on_window is not None:
            on_window([job for job in slots if job is not None])
        for b, job in enumerate(slots):
            if job is not None and (completion := _finish(job, tokenizer, eos_ids)) is not None:
                slots[b] = None
                yield completion


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seed_of_choice(seed: int, choice: int) -> int:
    """Choice i's own seed: a mix of the request's seed and i, below 2^63."""
    return (seed * 0x9E3779B97F4A7C15 + choice * 0xBF58476D1CE4E5B9 + choice) % 2**63 if choice else seed


# ---- the library


class LLM:
    """A model loaded once with its cache settings; generate() and stream() run requests."""

    def __init__(self, checkpoint: str | None = None, kv: str = "kivi2", batch_size: int | str = "auto",
                 device: str = "auto", dtype: str | None = None, compile: bool | None = None, group_size: int = 32,
                 residual_length: int = 128, sink_tokens: int = 0, random_weights: bool = False):
        cache = CacheConfig(kv, group_size, residual_length, sink_tokens)
        parse_kv_mode(kv)
        device_ = pick_device(device)
        device_ = tp.init(device_.type) or device_  # under torchrun: this rank's device
        model, tokenizer, generation_config = load_model(checkpoint, device_, pick_dtype(dtype, device_), random_weights)
        self._setup(model, tokenizer, generation_config, cache, batch_size, compile)

    @classmethod
    def from_model(cls, model: Transformer, tokenizer: Tokenizer | None = None, cache: CacheConfig = CacheConfig("kivi2"),
                   batch_size: int | str = "auto", compile: bool | None = None, generation_config: dict | None = None) -> "LLM":
        """An LLM over a model already built (benchmarks, tests)."""
        llm = cls.__new__(cls)
        llm._setup(model, tokenizer, generation_config or {}, cache, batch_size, compile)
        return llm

    def _setup(self, model: Transformer, tokenizer: Tokenizer | None, generation_config: dict, cache: CacheConfig,
               batch_size: int | str, compile: bool | None) -> None:
        if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        cache.check(model.args.head_dim)
        weight = model.tok_embeddings.weight
        self.model, self.tokenizer, self.cache, self.batch_size = model, tokenizer, cache, batch_size
        self.device, self.dtype = weight.device, weight.dtype
        self.defaults = SamplingParams.from_generation_config(generation_config)
        eos = generation_config.get("eos_token_id")
        self.eos_ids = (tokenizer.eos_ids if tokenizer else set()) | set(
            [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else [])
        self.sync_every = SYNC_EVERY
        self.step = compiled(decode_step, self.device, compile)
        self.warmup = self.step is not decode_step  # compiled: capture before the clock starts
        self.stats: dict = {}  # of the last run: batch_size, prefill_s, decode_s, decode_steps, warmup_s

    def encode(self, request: str | list | dict) -> tuple[list[int], dict]:
        """A request -> (prompt token ids, its own sampling fields); a ValueError says what is wrong."""
        fields_ = {}
        if isinstance(request, dict):
            fields_ = {k: v for k, v in request.items() if k not in ("prompt", "messages")}
            if ("prompt" in request) == ("messages" in request):
                raise ValueError("a request dict needs exactly one of 'prompt' and 'messages'")
            if "messages" in request:
                request = request["messages"]
                if not isinstance(request, list) or not request or not all(isinstance(m, dict) for m in request):
                    raise ValueError("messages must be a non-empty list of chat messages")
            elif isinstance(request["prompt"], list):  # token ids
                ids = request["prompt"]
                if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.model.args.vocab_size
                                      for t in ids):
                    raise ValueError(f"prompt token ids must be a non-empty list in [0, {self.model.args.vocab_size})")
                return ids, fields_
            elif not isinstance(request["prompt"], str):
                raise ValueError("prompt must be a string or a list of token ids")
            else:
                request = request["prompt"]
        if isinstance(request, str):
            if not request.strip():
                raise ValueError("empty prompt")
            return self._tokenizer().encode(request, bos=self._tokenizer().add_bos), fields_
        if isinstance(request, list) and request and all(isinstance(m, dict) for m in request):
            for m in request:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError("each chat message needs a string 'role' and 'content'")
            return self._tokenizer().encode_chat(request), fields_
        raise ValueError("a request is a prompt string, a list of chat messages, or a dict with 'prompt' or 'messages'")

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (random weights): give prompts as token ids")
        return self.tokenizer

    def jobs(self, requests: list, **sampling) -> list[_Job]:
        """Every choice of every request as a job, all checked before anything runs (a
        ValueError names the request)."""
        if not isinstance(requests, list):
            raise ValueError("requests must be a list")
        defaults = self.defaults.update(sampling)
        jobs = []
        for i, request in enumerate(requests):
            try:
                prompt, own = self.encode(request)
                params = defaults.update(own)
                total = len(prompt) + params.max_new_tokens
                if total > self.model.args.max_seq_len:
                    raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens {params.max_new_tokens} = {total} "
                                     f"exceeds the model's context of {self.model.args.max_seq_len} tokens")
                if params.stop and self.tokenizer is None:
                    raise ValueError("stop strings need a tokenizer")
            except ValueError as e:
                raise ValueError(f"request {i}: {e}") from None
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**63 - 1, ()).item())
            jobs += [_Job(i, c, prompt, params, _seed_of_choice(seed, c)) for c in range(params.n)]
        return jobs

    def run(self, jobs: list[_Job], refill: bool = True, on_window: Callable | None = None) -> Iterator[Completion]:
        """Run jobs from jobs(), yielding each completion as it ends."""
        self.stats = {}
        if not jobs:
            return
        max_seq_len = max(len(job.prompt) + job.params.max_new_tokens for job in jobs)
        if self.batch_size == "auto" and self.device.type != "cuda":
            batch_size = min(8, len(jobs))
        else:
            batch_size = min(plan_batch_size(self.batch_size, self.model.args, self.cache, max_seq_len, self.device,
                                             self.dtype), len(jobs))
        self.stats["batch_size"] = batch_size
        yield from run_jobs(self.model, self.tokenizer, jobs, batch_size, max_seq_len, self.cache, self.step,
                            self.eos_ids, self.stats, refill, self.sync_every, on_window, self.warmup)

    def stream(self, requests: list, **sampling) -> Iterator[Completion]:
        """Each completion as it finishes (sampling: SamplingParams fields for every request)."""
        return self.run(self.jobs(requests, **sampling))

    def generate(self, requests: list, **sampling) -> list[Completion]:
        """Every completion, in request order (a request's n choices in choice order)."""
        return sorted(self.stream(requests, **sampling), key=lambda c: (c.request, c.choice))


class Chat:
    """A multi-turn chat kept in one cache slot between turns: each turn renders the whole
    conversation with the chat template, and only the tokens past what the cache already
    holds (the longest common prefix) go through the model."""

    def __init__(self, llm: LLM, system: str | None = None, context: int | None = None):
        self.llm = llm
        self.context = min(llm.model.args.max_seq_len, context or 8192)  # the slot's length, fixed for the chat
        self.messages = [{"role": "system", "content": system}] if system else []
        self.cached: list[int] = []  # the tokens whose keys and values the slot holds, from position 0

    def send(self, text: str, on_window: Callable | None = None, **sampling) -> Completion:
        """The assistant's reply to `text` (sampling: SamplingParams fields)."""
        messages = self.messages + [{"role": "user", "content": text}]
        (job,) = self.llm.jobs([messages], **sampling)
        if len(job.prompt) + job.params.max_new_tokens > self.context:
            raise ValueError(f"the conversation ({len(job.prompt)} tokens) and max_new_tokens "
                             f"{job.params.max_new_tokens} no longer fit the chat's {self.context} tokens: start a new one")
        model = self.llm.model
        if getattr(model, "cache_setup", None) != (self.llm.cache, 1, self.context) or getattr(model, "chat", None) is not self:
            self.cached = []  # another run or chat used the model's caches since this chat's last turn
        shared = next((i for i, (a, b) in enumerate(zip(self.cached, job.prompt)) if a != b),
                      min(len(self.cached), len(job.prompt)))
        job.resume = min(shared, len(job.prompt) - 1)
        self.llm.stats = {}
        # one step a window: no step runs past the reply, so the slot holds exactly self.cached
        # afterwards (a KIVI ring overrun would overwrite positions the next turn reads); no
        # warm-up steps either once the slot holds the conversation
        (reply,) = run_jobs(model, self.llm.tokenizer, [job], 1, self.context, self.llm.cache, self.llm.step,
                            self.llm.eos_ids, self.llm.stats, sync_every=1, on_window=on_window,
                            warmup=self.llm.warmup and not job.resume)
        model.chat = self
        # every generated token but the last went back in as an input
        self.cached = job.prompt + job.tokens[: reply.completion_tokens - 1]
        self.messages = messages + [{"role": "assistant", "content": reply.text}]
        return reply
