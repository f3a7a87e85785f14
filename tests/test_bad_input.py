"""Bad input to the checkpoint, tokenizer and script code: one clear line and a non-zero exit."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.errors import GatedRepoError, HTTPError, RepositoryNotFoundError

import checkpoint
from checkpoint import CheckpointError, resolve_checkpoint
from model import ModelArgs
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96, vocab_size=256, max_seq_len=512)
HF_TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 256}


def one_line_error(error: type[Exception], call, *args) -> str:
    with pytest.raises(error) as e:
        call(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def write_config(path: Path, config: dict) -> Path:
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_engine_config_must_name_every_field_without_a_safe_default(tmp_path):
    TINY.save(tmp_path / "full.json")
    config = json.loads((tmp_path / "full.json").read_text())
    broken = write_config(tmp_path / "broken", {k: v for k, v in config.items() if k not in ("n_layers", "rope_base", "max_seq_len")})
    message = one_line_error(CheckpointError, resolve_checkpoint, str(broken))
    assert message == f"{broken}/config.json has no n_layers, rope_base, max_seq_len"
    # the fields of the non-Llama families may be absent: such a config gets as far as the weights
    llama = {k: v for k, v in config.items() if k not in checkpoint._OPTIONAL_FIELDS}
    message = one_line_error(CheckpointError, resolve_checkpoint, str(write_config(tmp_path / "llama", llama)))
    assert message == f"missing {tmp_path}/llama/model.safetensors"


def test_corrupt_tokenizer_json_names_the_file(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    text = (tmp_path / "tokenizer.json").read_text()
    for corrupt in (text[: len(text) // 2], "not json", "{}"):
        (tmp_path / "tokenizer.json").write_text(corrupt)
        assert one_line_error(ValueError, load_tokenizer, tmp_path).startswith(f"cannot read {tmp_path}/tokenizer.json: ")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
    assert one_line_error(ValueError, load_tokenizer, tmp_path).startswith(f"cannot read {tmp_path}/tokenizer_config.json: ")


@pytest.mark.parametrize("config, message", [
    ({**vars(TINY), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE scaling"),
    ({**HF_TINY, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE type 'yarn'"),
    ({**HF_TINY, "rope_scaling": {"type": "longrope", "factor": 4.0}}, "unsupported RoPE type 'longrope'"),
    ({**HF_TINY, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "unsupported RoPE type 'yarn'"),
    ({**vars(TINY), "rope_scaling": "linear"}, "rope_scaling must be an object or null, not 'linear'"),
])
def test_unsupported_rope_scaling_is_one_error(tmp_path, config, message):
    path = write_config(tmp_path / "ckpt", config)
    assert one_line_error(CheckpointError, resolve_checkpoint, str(path)).startswith(f"{path}/config.json: {message}")


def test_download_rejects_an_invalid_repo_id_before_asking_the_hub(tmp_path):
    r = run_script("download", "not a/valid//repo id!!", "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [("error: 'not a/valid//repo id!!' is not a Hugging Face repo id "
                                      "(owner/name, of letters, digits, '-', '_' and '.')")]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("error, message", [
    (GatedRepoError("401 Client Error", response=SimpleNamespace(headers={}, request=None)), "org/tiny is gated"),
    (RepositoryNotFoundError("404 Client Error", response=SimpleNamespace(headers={}, request=None)), "no repo org/tiny"),
    (HTTPError("[Errno -3] Temporary failure in name resolution"), "cannot reach the Hugging Face Hub: [Errno -3]"),
])
def test_download_hub_errors_are_one_line(tmp_path, monkeypatch, capsys, error, message):
    download = load_script("download")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(download, "list_repo_files", fail)
    assert download.main(["org/tiny", "--out", str(tmp_path / "x")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")


def test_staging_leftovers_of_a_killed_import_are_removed(tmp_path):
    out = tmp_path / "tiny"
    leftover, other = tmp_path / ".tiny.k1ll3d_x", tmp_path / ".tiny.x.abcd1234"  # other: staging of "tiny.x"
    for d in (leftover, other):
        d.mkdir(mode=0o700)
        (d / "model.safetensors").write_bytes(b"partial")
    with checkpoint._staging_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.x.abcd1234", "tiny"]
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_eval_ppl_checks_the_json_folder_first(tmp_path):
    r = run_script("eval_ppl", "--text", str(tmp_path / "absent.txt"), "--json", str(tmp_path / "no" / "ppl.json"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: --json {tmp_path}/no/ppl.json: there is no folder {tmp_path}/no"]


def test_bench_attention_checks_the_other_version_first(tmp_path):
    (tmp_path / "mma_attention.py").write_text("")
    r = run_script("bench_attention", "--against", str(tmp_path))
    assert r.returncode != 0
    assert r.stderr.splitlines() == [f"error: --against {tmp_path}: no decode_attention.py"]


def test_fetch_data_help_downloads_nothing(monkeypatch, capsys):
    fetch_data = load_script("fetch_data")

    def fetch(*args):
        raise AssertionError("--help fetched")

    monkeypatch.setattr(fetch_data, "fetch", fetch)
    with pytest.raises(SystemExit) as e:
        fetch_data.main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")
