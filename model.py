"""A minimal decoder-only transformer for the Llama family and its relatives: RMSNorm or
LayerNorm, RoPE (linear, dynamic NTK or Llama-3.1 scaling), SwiGLU or GELU MLP, grouped- and
multi-query attention with optional q/k/v biases, per-head q/k norms and a sliding window,
sequential (Llama, Mistral, Qwen) or parallel (Falcon) blocks, optional tied embeddings.

The KV cache is a separate module each attention layer calls through two methods:
    cache.prefill(prompts, k, v)        k, v [N, kv_heads, head_dim]: the tokens of n prompts
                                        packed along one axis (kivi_cache.PackedPrompts)
    cache.decode(q, k, v, input_pos)    q [B, heads, D], k, v [B, kv_heads, D] -> [B, heads, D]
Prefill takes several prompts of different lengths packed into one row of tokens and attends
in full precision within each prompt (varlen flash attention on the GPU); decode appends the
new token of every slot at its own position `input_pos[b]` and attends over positions
0..input_pos[b].

Weights use the Hugging Face q/k layout for RoPE (rotate-half: the two halves of each head
are the real and imaginary parts), so HF checkpoints need no permutation.
"""

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import tp
from kernels import pointwise
from kivi_cache import PackedPrompts

# cuDNN attention (the default on Hopper) builds a plan for every new prompt length, about
# 1 ms of host time a layer: batch generation meets a new length with nearly every prompt.
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "falcon")  # what from_hf_config reads
ROPE_TYPES = ("linear", "dynamic", "llama3")  # rope_scaling["rope_type"]; None is plain RoPE


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # {"rope_type": "linear", "factor"}, {"rope_type": "dynamic", "factor", "original_max_position_embeddings"}
    # or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    max_seq_len: int = 4096  # the model's context length
    tie_embeddings: bool = False
    head_dim: int = 0  # 0: dim // n_heads
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with bias)
    mlp: str = "swiglu"  # "swiglu": w2(silu(gate) * up); "gelu": w2(gelu(up))
    parallel_block: bool = False  # attention and MLP both read the block's input, their outputs are added (Falcon)
    shared_norm: bool = False  # parallel block: one norm feeds attention and MLP (Falcon-7B) instead of one each
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    sliding_window: int = 0  # 0: none; else a query at position i sees the keys at i - W < j <= i

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE scaling {self.rope_scaling}: rope_type must be one of {', '.join(ROPE_TYPES)}")
        if self.norm not in ("rms", "layer") or self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"unknown norm {self.norm!r} or mlp {self.mlp!r}: norm is rms or layer, mlp swiglu or gelu")
        if self.shared_norm and not self.parallel_block:
            raise ValueError("shared_norm needs parallel_block")

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        key = name.lower()
        if key not in CONFIGS:
            raise ValueError(f"unknown model '{name}': known are {', '.join(sorted(CONFIGS))}")
        return cls(**CONFIGS[key])

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """Build from a Hugging Face `config.json` whose model_type is one of HF_MODEL_TYPES
        (transformers 4 spelling `rope_theta` / `rope_scaling`, or 5's `rope_parameters`)."""
        model_type = config.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported: supported are {', '.join(HF_MODEL_TYPES)}")
        common = dict(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            tie_embeddings=config.get("tie_word_embeddings", model_type == "falcon"),
            **_hf_rope(config),
        )
        if model_type == "falcon":
            return cls(**common, **_falcon_args(config))
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported, only silu")
        return cls(
            **common,
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-5),
            head_dim=config.get("head_dim") or 0,
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=_hf_sliding_window(config),
        )

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """A Hugging Face config (it names its model_type) or the engine's own."""
        return cls.from_hf_config(config) if "model_type" in config else cls(**config)

    @classmethod
    def load(cls, path: Path) -> "ModelArgs":
        return cls.from_config(json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def _hf_rope(config: dict) -> dict:
    """rope_base, rope_scaling and max_seq_len of a Hugging Face config."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    max_pos = config.get("max_position_embeddings", 2048)
    args = dict(rope_base=rope.get("rope_theta", config.get("rope_theta", 10000.0)), rope_scaling=None, max_seq_len=max_pos)
    if kind == "linear":
        args["rope_scaling"] = {"rope_type": kind, "factor": rope["factor"]}
    elif kind == "dynamic":  # the point of dynamic scaling: a context of factor times the trained one
        args["rope_scaling"] = {"rope_type": kind, "factor": rope["factor"], "original_max_position_embeddings": max_pos}
        args["max_seq_len"] = int(max_pos * rope["factor"])
    elif kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        args["rope_scaling"] = {"rope_type": kind, **{k: rope[k] for k in keys}}
    elif kind != "default":
        raise ValueError(f"unsupported RoPE type {kind!r}: supported are default, {', '.join(ROPE_TYPES)}")
    return args


def _hf_sliding_window(config: dict) -> int:
    """Mistral: its sliding_window. Qwen: only with use_sliding_window, on the layers that
    layer_types marks, else on layers max_window_layers and up; the engine needs all or none."""
    window = config.get("sliding_window") or 0
    if config["model_type"] == "mistral":
        return window
    if config["model_type"] not in ("qwen2", "qwen3") or not config.get("use_sliding_window") or not window:
        return 0
    n = config["num_hidden_layers"]
    windowed = [t == "sliding_attention" for t in config.get("layer_types") or []] or \
               [i >= config.get("max_window_layers", 28) for i in range(n)]
    if all(windowed):
        return window
    if not any(windowed):
        return 0
    raise ValueError(f"a sliding window on {sum(windowed)} of {n} layers is not supported, only on all or none")


def _falcon_args(config: dict) -> dict:
    """Falcon-7B (multi-query, one LayerNorm) and the new decoder architecture (Falcon-40B, 180B:
    grouped KV heads, ln_attn and ln_mlp); both parallel, rotary, GELU, no linear biases."""
    for key, supported in (("alibi", False), ("bias", False), ("parallel_attn", True), ("activation", "gelu")):
        if config.get(key, supported) != supported:
            raise ValueError(f"Falcon with {key}={config[key]!r} is not supported")
    new = config.get("new_decoder_architecture", False)
    n_heads = config["num_attention_heads"]
    if new:
        n_kv_heads = config.get("num_kv_heads") or n_heads
    else:
        n_kv_heads = 1 if config.get("multi_query", True) else n_heads
    return dict(
        n_kv_heads=n_kv_heads,
        intermediate_size=config.get("ffn_hidden_size") or 4 * config["hidden_size"],
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        norm="layer",
        mlp="gelu",
        parallel_block=True,
        shared_norm=not new or config.get("num_ln_in_parallel_attn") == 1,
    )


_LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
_FALCON = dict(vocab_size=65024, max_seq_len=2048, norm="layer", mlp="gelu", parallel_block=True, tie_embeddings=True)

CONFIGS = {
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, intermediate_size=13824),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                       vocab_size=128256, rope_base=500000.0, max_seq_len=8192),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                         vocab_size=128256, rope_base=500000.0, max_seq_len=131072, rope_scaling=_LLAMA31_SCALING),
    "llama-3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672,
                          vocab_size=128256, rope_base=500000.0, max_seq_len=131072, rope_scaling=_LLAMA31_SCALING),
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                       max_seq_len=32768, sliding_window=4096),
    "qwen2.5-7b": dict(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, intermediate_size=18944, vocab_size=152064,
                       norm_eps=1e-6, rope_base=1000000.0, max_seq_len=32768, qkv_bias=True),
    "qwen3-8b": dict(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, intermediate_size=12288,
                     vocab_size=151936, norm_eps=1e-6, rope_base=1000000.0, max_seq_len=40960, qk_norm=True),
    "falcon-7b": dict(dim=4544, n_layers=32, n_heads=71, n_kv_heads=1, intermediate_size=18176, shared_norm=True, **_FALCON),
    "falcon-40b": dict(dim=8192, n_layers=60, n_heads=128, n_kv_heads=8, intermediate_size=32768, **_FALCON),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536, vocab_size=49152,
                         rope_base=100000.0, max_seq_len=8192, tie_embeddings=True),
}


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies [head_dim / 2], with linear or Llama-3.1 scaling when configured
    (dynamic scaling depends on the sequence length: `dynamic_frequencies`)."""
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    if args.rope_type == "linear":
        inv_freq = inv_freq / args.rope_scaling["factor"]
    elif args.rope_type == "llama3":
        inv_freq = _llama3_frequencies(inv_freq, args.rope_scaling)
    return inv_freq.float()


def _llama3_frequencies(inv_freq: Tensor, scaling: dict) -> Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_context / low) & (wavelen >= old_context / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def dynamic_frequencies(args: ModelArgs, inv_freq: Tensor, seq_len: Tensor) -> Tensor:
    """Dynamic NTK scaling: inv_freq [D/2] for positions in sequences of seq_len [B or 1, T or 1]
    tokens -> [B or 1, T or 1, D/2]. Past the original context the RoPE base grows to
    base * (factor * seq_len / context - (factor - 1)) ** (D / (D - 2)); up to it, no change."""
    factor, context = args.rope_scaling["factor"], args.rope_scaling["original_max_position_embeddings"]
    stretch = (factor * seq_len / context - (factor - 1)).clamp(min=1)[..., None]  # [B or 1, T or 1, 1]
    exponent = torch.arange(0, args.head_dim, 2, device=inv_freq.device) / (args.head_dim - 2)
    return inv_freq * stretch ** -exponent


def fused_kernels(x: Tensor) -> bool:
    """Whether the elementwise chains below run as one Triton kernel each (kernels/pointwise.py):
    in the eager forward on the GPU, prefill above all. Compiled code takes the PyTorch, which
    Inductor fuses itself; the CPU takes it too. The PyTorch is the kernels' reference."""
    return x.is_cuda and not torch.compiler.is_compiling()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, heads, D] in rotate-half layout (halves x1, x2: real and imaginary parts);
    cos [B or 1, T, 1, D] float32 the cosine of each angle, twice, and sin its sine with the
    first copy negated, so that x1 cos - x2 sin, x2 cos + x1 sin is x cos + [x2, x1] sin."""
    if fused_kernels(x):
        return pointwise.rope(x, cos, sin)
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([x2, x1], dim=-1) * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalized in float32, scaled in the model dtype (as Llama's reference does)
        if fused_kernels(x):
            return pointwise.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def make_norm(args: ModelArgs) -> nn.Module:
    return RMSNorm(args.dim, args.norm_eps) if args.norm == "rms" else nn.LayerNorm(args.dim, args.norm_eps)


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal attention where query i sees keys i - window < j <= i: q, k, v [B, heads, T, D]
    (kv heads expanded). Queries go in chunks of C >= window positions, chunk [c0, c0 + C)
    reading keys [c0 - window + 1, c0 + C), so time and memory follow T * window, not T^2."""
    T, C = q.shape[2], max(window, 256)
    out = []
    for c0 in range(0, T, C):
        c1, k0 = min(c0 + C, T), max(0, c0 - window + 1)
        behind = torch.arange(c0, c1, device=q.device)[:, None] - torch.arange(k0, c1, device=q.device)[None]
        mask = (behind >= 0) & (behind < window)  # [c1 - c0, c1 - k0]
        out.append(F.scaled_dot_product_attention(q[:, :, c0:c1], k[:, :, k0:c1], v[:, :, k0:c1], attn_mask=mask))
    return torch.cat(out, dim=2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """q [B, heads, T, D], k, v [B, kv_heads, T, D] -> [B, heads, T, D]; window 0: none."""
    with sdpa_kernel(PREFILL_ATTENTION):
        if 0 < window < q.shape[2]:
            # with a mask, grouped kv heads would take SDPA's math path: expand them
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
            return windowed_attention(q, k, v, window)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def packed_attention(q: Tensor, k: Tensor, v: Tensor, prompts: PackedPrompts, window: int) -> Tensor:
    """Causal attention within each of several packed sequences: q [N, heads, D], k, v
    [N, kv_heads, D], sequence i the next prompts.seq_lens[i] rows -> [N, heads, D]. On CUDA in 16-bit
    floats one varlen flash-attention call (kv heads grouped natively; the window as flash's
    left size W - 1: query i sees keys i - W + 1 .. i); elsewhere causal_attention a sequence."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu_lens, longest = prompts.cu_lens(), max(prompts.seq_lens)
        left, right = (window - 1, 0) if window > 0 else (None, None)
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_lens, cu_lens, longest, longest, 0.0, True, False, window_size_left=left, window_size_right=right,
        )[0]
    out = [causal_attention(*(t.transpose(0, 1)[None] for t in qkv), window)[0].transpose(0, 1)
           for qkv in zip(q.split(prompts.seq_lens), k.split(prompts.seq_lens), v.split(prompts.seq_lens))]
    return torch.cat(out)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.sliding_window = args.sliding_window
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.kv_cache: nn.Module | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None,
                prompts: PackedPrompts | None) -> Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv = self.wqkv(x)  # [B, T, q_size + 2 * kv_size]
        qk = qkv[..., : q_size + kv_size].view(B, T, self.n_heads + self.n_kv_heads, self.head_dim)
        v = qkv[..., q_size + kv_size :].view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, : self.n_heads]), self.k_norm(qk[:, :, self.n_heads :])], dim=2)
        q, k = apply_rope(qk, cos, sin).split([self.n_heads, self.n_kv_heads], dim=2)  # RoPE on q and k at once
        if input_pos is not None:  # decode: one new token per slot, through the cache
            y = self.kv_cache.decode(q[:, 0], k[:, 0], v[:, 0], input_pos)  # [B, heads, D]
            return self.wo(y.reshape(B, 1, q_size))
        if prompts is not None:  # prefill: B == 1, the prompts packed along T
            self.kv_cache.prefill(prompts, k[0], v[0])
            y = packed_attention(q[0], k[0], v[0], prompts, self.sliding_window)  # [T, heads, D]
            return self.wo(y.reshape(1, T, q_size))
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.sliding_window)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gated = args.mlp == "swiglu"
        # w13: gate and up projections side by side (SwiGLU), or the up projection alone (GELU)
        self.w13 = nn.Linear(args.dim, (2 if self.gated else 1) * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.gated:
            return self.w2(F.gelu(self.w13(x)))
        if fused_kernels(x):
            return self.w2(pointwise.swiglu(self.w13(x)))
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.parallel = args.parallel_block
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = make_norm(args)
        self.ffn_norm = None if args.shared_norm else make_norm(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None,
                prompts: PackedPrompts | None) -> Tensor:
        # under tensor parallelism attention and MLP give this rank's partial sums (tp.py)
        h = self.attention_norm(x)
        attn = self.attention(h, cos, sin, input_pos, prompts)
        if self.parallel:
            return x + tp.all_reduce(attn + self.feed_forward(h if self.ffn_norm is None else self.ffn_norm(x)))
        h = x + tp.all_reduce(attn)
        return h + tp.all_reduce(self.feed_forward(self.ffn_norm(h)))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = make_norm(args)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.inv_freq = rope_frequencies(args)  # float32 whatever the model dtype: a plain attribute, .to() skips it

    def set_caches(self, make_cache) -> None:
        """Give every attention layer its own cache: `make_cache()` builds one."""
        for layer in self.layers:
            layer.attention.kv_cache = make_cache()

    def rope(self, positions: Tensor, seq_len: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B or 1, T] -> cos, sin [B or 1, T, 1, D] as apply_rope takes them. Dynamic
        scaling takes the frequencies of each position's sequence length seq_len [B or 1, T or 1]."""
        inv_freq = self.inv_freq
        if self.args.rope_type == "dynamic":
            inv_freq = dynamic_frequencies(self.args, inv_freq, seq_len)  # [B or 1, T or 1, D/2]
        angles = positions.float()[..., None] * inv_freq  # [B or 1, T, D/2]
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], dim=-1)[:, :, None], torch.cat([-sin, sin], dim=-1)[:, :, None]

    def forward(
        self, tokens: Tensor, input_pos: Tensor | None = None, prompts: PackedPrompts | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (float32); with last_only, each sequence's last.

        input_pos None, prompts None: plain causal forward over positions 0..T-1, no cache.
        prompts (n lengths summing to T): prefill of n prompts packed in tokens [1, T], prompt
            i into cache slot prompts.slots[i] at positions 0..prompts.seq_lens[i]-1; with
            last_only, logits [1, n, vocab].
        input_pos [B]: decode, T == 1, slot b's token at position input_pos[b].
        """
        B, T = tokens.shape
        if input_pos is not None:
            positions = input_pos[:, None]
            seq_len = positions + 1
        elif prompts is not None:
            seq_lens = prompts.seq_lens
            if B != 1 or sum(seq_lens) != T:
                raise ValueError(f"prefill packs prompts in one row: tokens {list(tokens.shape)}, "
                                 f"lengths summing to {sum(seq_lens)}")
            positions = prompts.part([0] * len(seq_lens), seq_lens)[2][None]  # the plain cache's write indices too
            seq_len = torch.cat([torch.full((n,), n) for n in seq_lens]).to(tokens.device)[None]
        else:
            positions = torch.arange(T, device=tokens.device)[None]
            seq_len = positions[:, -1:] + 1
        cos, sin = self.rope(positions, seq_len)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, prompts)
        if last_only:
            ends = list(itertools.accumulate(prompts.seq_lens)) if prompts is not None else [T]
            x = x[:, [end - 1 for end in ends]]
        x = self.norm(x)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(x, weight).float()


def build_model(args: ModelArgs, state_dict: dict[str, Tensor] | None, device: torch.device, dtype: torch.dtype,
                world: int = 1) -> Transformer:
    """The model in eval mode on `device` in `dtype`, with `state_dict`'s weights or random
    ones (benchmarks: speed does not depend on the weights' values). world > 1: this rank's
    part of it (tp.py), its args the shapes the rank holds."""
    if world > 1:
        tp.check(args, world)
        args = tp.local_args(args, world)
    with torch.device("meta" if state_dict is not None else device):
        model = Transformer(args)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype)
    if device.type == "cpu" and dtype == torch.float32:
        use_cpu_layout(model)
    model.inv_freq = rope_frequencies(args).to(device)
    return model.eval().requires_grad_(False)


def use_cpu_layout(model: Transformer) -> None:
    """Store the float32 weight matrices with at least as many outputs as inputs (qkv, gate/up,
    a square output projection, the head, with a tied embedding) column-major: the transpose of
    a contiguous [in, out] matrix, same shape and values. With MKL on a 2-core AMD EPYC a
    single token's matrix-vector products then stream those weights at 13-26 GB/s instead of
    11.5-12 (the embedded model's products 28.2 ms a token instead of 42.3, the head's 4.4
    instead of 9.3; `python benchmarks/cpu_layout.py`); narrower matrices (the MLP's down
    projection) are faster row-major, and so is bfloat16. Steps of 2 rows gain more (1.73x),
    of 4 to 64 rows lose 4-10%: the CPU's default batch is at most 8, its main use one sequence."""
    matrices = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    if model.output is None:  # the tied head is the embedding
        matrices.append(model.tok_embeddings.weight)
    for weight in matrices:
        if weight.shape[0] >= weight.shape[1]:
            weight.data = weight.data.T.contiguous().T
