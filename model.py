"""A minimal Llama-family transformer: RMSNorm, RoPE (with Llama-3.1 scaling), SwiGLU,
grouped-query attention, optional tied embeddings.

The KV cache is a separate module each attention layer calls through two methods:
    cache.prefill(slots, k, v)          k, v [n, kv_heads, T, head_dim], positions 0..T-1
    cache.decode(q, k, v, input_pos)    q [B, heads, D], k, v [B, kv_heads, D] -> [B, heads, D]
Prefill attends in full precision over the prompt itself; decode appends the new token of
every slot at its own position `input_pos[b]` and attends over positions 0..input_pos[b].

Weights use the Hugging Face q/k layout for RoPE (rotate-half: the two halves of each head
are the real and imaginary parts), so HF checkpoints load as they are.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN attention (the default on Hopper) builds a plan for every new prompt length, about
# 1 ms of host time a layer: batch generation meets a new length with nearly every prompt.
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
    rope_scaling: dict | None = None  # Llama-3.1: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    max_seq_len: int = 4096  # the model's context length
    tie_embeddings: bool = False
    head_dim: int = 0  # 0: dim // n_heads

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        key = name.lower()
        if key not in CONFIGS:
            raise ValueError(f"unknown model '{name}': known are {', '.join(sorted(CONFIGS))}")
        return cls(**CONFIGS[key])

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """Build from a Hugging Face `config.json` of a Llama-family model (transformers 4
        spelling `rope_theta` / `rope_scaling`, or 5's `rope_parameters`)."""
        rope = config.get("rope_parameters")
        if rope is not None:
            scaling = None if rope.get("rope_type", "default") == "default" else rope
            config = {**config, "rope_theta": rope.get("rope_theta", 10000.0), "rope_scaling": scaling}
        rope_scaling = config.get("rope_scaling")
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) != "llama3":
            raise ValueError(f"unsupported rope_scaling {rope_scaling}: only Llama-3.1 ('llama3') scaling is implemented")
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_base=config.get("rope_theta", 10000.0),
            rope_scaling=rope_scaling,
            max_seq_len=config.get("max_position_embeddings", 4096),
            tie_embeddings=config.get("tie_word_embeddings", False),
            head_dim=config.get("head_dim") or 0,
        )

    @classmethod
    def load(cls, path: Path) -> "ModelArgs":
        return cls(**json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


_LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

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
                       max_seq_len=32768, rope_base=1000000.0),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536, vocab_size=49152,
                         rope_base=100000.0, max_seq_len=8192, tie_embeddings=True),
}


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies [head_dim / 2], with Llama-3.1 scaling when configured."""
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    if args.rope_scaling is None:
        return inv_freq.float()
    factor = args.rope_scaling["factor"]
    low, high = args.rope_scaling["low_freq_factor"], args.rope_scaling["high_freq_factor"]
    old_context = args.rope_scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_context / low) & (wavelen >= old_context / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, heads, D] in rotate-half layout; cos, sin [B or 1, T, 1, D / 2] float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: nn.Module | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, slots: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if input_pos is not None:  # decode: one new token per slot, through the cache
            y = self.kv_cache.decode(q[:, 0], k[:, 0], v[:, 0], input_pos)  # [B, heads, D]
            return self.wo(y.reshape(B, 1, q_size))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if slots is not None:
            self.kv_cache.prefill(slots, k, v)
        with sdpa_kernel(PREFILL_ATTENTION):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, slots: Tensor | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, slots)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.inv_freq = rope_frequencies(args)  # float32 whatever the model dtype: a plain attribute, .to() skips it

    def set_caches(self, make_cache) -> None:
        """Give every attention layer its own cache: `make_cache()` builds one."""
        for layer in self.layers:
            layer.attention.kv_cache = make_cache()

    def forward(
        self, tokens: Tensor, input_pos: Tensor | None = None, slots: Tensor | None = None, last_only: bool = False
    ) -> Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (float32); [B, 1, vocab] with last_only.

        input_pos None, slots None: plain causal forward over positions 0..T-1, no cache.
        slots [B]: prefill of B prompts into those cache slots (positions 0..T-1).
        input_pos [B]: decode, T == 1, slot b's token at position input_pos[b].
        """
        B, T = tokens.shape
        positions = input_pos[:, None] if input_pos is not None else torch.arange(T, device=tokens.device)[None]
        angles = positions.float()[..., None] * self.inv_freq  # [B or 1, T, D/2]
        cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, slots)
        x = self.norm(x[:, -1:] if last_only else x)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(x, weight).float()



def build_model(args: ModelArgs, state_dict: dict[str, Tensor] | None, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The model in eval mode on `device` in `dtype`, with `state_dict`'s weights or random
    ones (benchmarks: speed does not depend on the weights' values)."""
    with torch.device("meta" if state_dict is not None else device):
        model = Transformer(args)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype)
    model.inv_freq = rope_frequencies(args).to(device)
    return model.eval().requires_grad_(False)
