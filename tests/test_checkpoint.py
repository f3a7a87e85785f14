import importlib.util
import json
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
from checkpoint import CheckpointError, convert_hf, embedded_gguf, expected_shapes, load_checkpoint, resolve_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_gguf_import(smollm_dir):
    args, sd = load_checkpoint(smollm_dir, "cpu", torch.float32)
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.head_dim) == (30, 576, 9, 3, 64)
    assert (args.intermediate_size, args.vocab_size, args.max_seq_len) == (1536, 49152, 8192)
    assert args.rope_base == 1e5 and args.tie_embeddings and args.rope_scaling is None
    assert args.norm_eps == pytest.approx(1e-5)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(args)
    assert "output.weight" not in sd and sd["layers.0.attention.wqkv.weight"].shape == (15 * 64, 576)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    assert sorted(p.name for p in smollm_dir.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_gguf_import_undoes_llama_cpp_qk_permutation(smollm_dir):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(embedded_gguf()).tensors if t.name.startswith("blk.29.attn_")}

    def gguf_weight(name):
        t = tensors[name]
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type)))

    def llama_cpp_permute(w, n_heads):  # as llama.cpp's converter writes HF q/k rows
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    _, sd = load_checkpoint(smollm_dir, "cpu", torch.float32)
    q, k, v = sd["layers.29.attention.wqkv.weight"].split([576, 192, 192])
    assert torch.equal(llama_cpp_permute(q, 9), gguf_weight("blk.29.attn_q.weight"))
    assert torch.equal(llama_cpp_permute(k, 3), gguf_weight("blk.29.attn_k.weight"))
    assert torch.equal(v, gguf_weight("blk.29.attn_v.weight"))
    assert not torch.equal(q, gguf_weight("blk.29.attn_q.weight"))


def write_tiny_tokenizer(hf_dir: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "a"}))


def tiny_hf_model(hf_dir: Path, tie: bool, fmt: str) -> dict[str, torch.Tensor]:
    """A random 2-layer GQA Llama saved in Hugging Face layout (bf16); returns its state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, rope_theta=50000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=512, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if fmt == "safetensors":
        model.save_pretrained(hf_dir, max_shard_size="100KB")
        assert len(list(hf_dir.glob("model-*.safetensors"))) > 1
    else:  # the older pickle format, sharded by hand (transformers 5 only writes safetensors)
        hf_dir.mkdir(parents=True)
        config.save_pretrained(hf_dir)
        names = list(model.state_dict())
        for i, part in enumerate([names[: len(names) // 2], names[len(names) // 2:]]):
            torch.save({n: model.state_dict()[n] for n in part}, hf_dir / f"pytorch_model-0000{i + 1}-of-00002.bin")
    write_tiny_tokenizer(hf_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_convert_hf(tmp_path, tie, fmt):
    hf = tiny_hf_model(tmp_path / "hf", tie, fmt)
    convert_hf(tmp_path / "hf", tmp_path / "out")
    args, sd = load_checkpoint(resolve_checkpoint(str(tmp_path / "out")), "cpu", torch.bfloat16)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim) == (64, 2, 4, 2, 16)
    assert (args.intermediate_size, args.vocab_size, args.max_seq_len, args.tie_embeddings) == (96, 256, 512, tie)
    assert args.rope_base == 50000.0 and args.norm_eps == 1e-6
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(args)
    assert ("output.weight" in sd) == (not tie)
    for i in range(2):
        h, p = f"model.layers.{i}.", f"layers.{i}."
        qkv = torch.cat([hf[h + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(sd[p + "attention.wqkv.weight"], qkv)
        assert torch.equal(sd[p + "feed_forward.w13.weight"], torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]))
        assert torch.equal(sd[p + "feed_forward.w2.weight"], hf[h + "mlp.down_proj.weight"])
        assert torch.equal(sd[p + "attention.wo.weight"], hf[h + "self_attn.o_proj.weight"])
        assert torch.equal(sd[p + "attention_norm.weight"], hf[h + "input_layernorm.weight"])
        assert torch.equal(sd[p + "ffn_norm.weight"], hf[h + "post_attention_layernorm.weight"])
    assert torch.equal(sd["tok_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(sd["norm.weight"], hf["model.norm.weight"])
    if not tie:
        assert torch.equal(sd["output.weight"], hf["lm_head.weight"])
    assert (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "tokenizer_config.json").exists()


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    tiny_hf_model(tmp_path / "hf", tie=True, fmt="safetensors")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_convert_hf_failure_leaves_nothing(tmp_path, monkeypatch):
    tiny_hf_model(tmp_path / "hf", tie=True, fmt="safetensors")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_hf(tmp_path / "hf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_convert_hf_rejects_other_architectures(tmp_path):
    tiny_hf_model(tmp_path / "hf", tie=True, fmt="safetensors")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported: supported are llama, mistral, qwen2, qwen3, falcon"):
        convert_hf(tmp_path / "hf", tmp_path / "out")


def one_line_error(name_or_path) -> str:
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(name_or_path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_resolve_by_name_and_unknown_name(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(checkpoint, "CHECKPOINTS_DIR", tiny_ckpt.parent)
    assert resolve_checkpoint("ckpt") == tiny_ckpt
    assert resolve_checkpoint(str(tiny_ckpt)) == tiny_ckpt
    message = one_line_error("no-such-model")
    assert "no-such-model" in message and "ckpt" in message and "smollm2-135m-instruct" in message


def test_resolve_default_imports_once(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    calls = []
    monkeypatch.setattr(checkpoint, "import_gguf", lambda src, out: (calls.append(src), shutil.copytree(tiny_ckpt, out)))
    path = resolve_checkpoint(None)
    assert path == tmp_path / "checkpoints" / "smollm2-135m-instruct" and calls == [embedded_gguf()]
    assert capsys.readouterr().out.count("\n") == 1
    assert resolve_checkpoint("smollm2-135m-instruct") == path and len(calls) == 1


@pytest.mark.parametrize("broken, expected", [
    ("no_weights", "model.safetensors"),
    ("no_config", "config.json"),
    ("bad_config", "config.json"),
    ("no_tokenizer", "tokenizer"),
    ("truncated", "model.safetensors"),
])
def test_resolve_broken_checkpoint(tiny_ckpt, broken, expected):
    weights = tiny_ckpt / "model.safetensors"
    if broken == "no_weights":
        weights.unlink()
    elif broken == "no_config":
        (tiny_ckpt / "config.json").unlink()
    elif broken == "bad_config":
        (tiny_ckpt / "config.json").write_text('{"dim": 64, "layers": 2}')
    elif broken == "no_tokenizer":
        (tiny_ckpt / "tokenizer.json").unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert expected in one_line_error(str(tiny_ckpt))


def test_load_checkpoint_names_first_problem(tiny_ckpt):
    config = json.loads((tiny_ckpt / "config.json").read_text())
    (tiny_ckpt / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight has shape \[256, 64\], expected \[300, 64\]"):
        load_checkpoint(tiny_ckpt, "cpu", torch.float32)
    (tiny_ckpt / "config.json").write_text(json.dumps({**config, "tie_embeddings": False}))
    with pytest.raises(CheckpointError, match="missing tensor output.weight"):
        load_checkpoint(tiny_ckpt, "cpu", torch.float32)


def test_hf_directory_loads_as_it_is(tmp_path):
    hf = tiny_hf_model(tmp_path / "hf", tie=False, fmt="safetensors")
    args, sd = load_checkpoint(resolve_checkpoint(str(tmp_path / "hf")), "cpu", torch.float32)
    assert (args.dim, args.n_layers, args.n_kv_heads, args.tie_embeddings) == (64, 2, 2, False)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(args)
    assert torch.equal(sd["output.weight"], hf["lm_head.weight"].float()) and sd["output.weight"].dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("broken, expected", [
    ("gpt2", "model_type 'gpt2' is not supported: supported are llama, mistral, qwen2, qwen3, falcon"),
    ("bin", "has no model*.safetensors"),
    ("no_key", "config.json has no 'hidden_size'"),
    ("missing_tensor", "missing tensor model.layers.1.mlp.up_proj.weight"),
    ("extra_tensor", "unsupported tensor model.layers.0.self_attn.o_proj.bias"),
])
def test_broken_hf_directory_is_one_clear_error(tmp_path, broken, expected):
    from safetensors.torch import load_file, save_file

    hf_dir = tmp_path / "hf"
    tiny_hf_model(hf_dir, tie=True, fmt="bin" if broken == "bin" else "safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    if broken == "gpt2":
        (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    elif broken == "no_key":
        (hf_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    elif broken in ("missing_tensor", "extra_tensor"):
        shard = next(f for f in sorted(hf_dir.glob("model-*.safetensors")) if "model.layers.1.mlp.up_proj.weight" in load_file(f))
        tensors = load_file(shard)
        if broken == "missing_tensor":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        else:
            tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
        save_file(tensors, shard)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(resolve_checkpoint(str(hf_dir)), "cpu", torch.float32)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_convert_script(tmp_path):
    tiny_hf_model(tmp_path / "hf", tie=False, fmt="safetensors")
    script = [sys.executable, str(ROOT / "scripts" / "convert_hf_checkpoint.py")]
    ok = subprocess.run(script + ["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
    bad = subprocess.run(script + ["--hf-dir", str(tmp_path / "none"), "--out", str(tmp_path / "out2")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def load_download_script():
    spec = importlib.util.spec_from_file_location("download_script", ROOT / "scripts" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_download(tmp_path, monkeypatch, fmt):
    tiny_hf_model(tmp_path / "repo", tie=True, fmt=fmt)
    download = load_download_script()

    def fake_snapshot_download(repo_id, token, allow_patterns, local_dir=None):  # the hub, serving tmp_path/repo
        assert repo_id == "org/Tiny-Llama"
        snapshot = Path(local_dir or tmp_path / "cache" / f"snapshot{len(list(tmp_path.glob('cache/*')))}")
        snapshot.mkdir(parents=True, exist_ok=True)
        for f in (tmp_path / "repo").iterdir():
            if any(fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, snapshot)
        return str(snapshot)

    monkeypatch.setattr(download, "list_repo_files", lambda repo_id, token: [f.name for f in (tmp_path / "repo").iterdir()])
    monkeypatch.setattr(download, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(download, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    assert download.main(["org/Tiny-Llama"]) == 0
    out = tmp_path / "checkpoints" / "tiny-llama"
    load_checkpoint(resolve_checkpoint(str(out)), "cpu", torch.float32)
    is_hf_directory = "model_type" in json.loads((out / "config.json").read_text())
    assert is_hf_directory == (fmt == "safetensors")  # safetensors: no conversion, no second copy
    assert (fmt == "bin") == (tmp_path / "cache").exists()


def test_download_error_is_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "download.py"), "org/missing", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()
