"""Bad input to generate.py: a clear one-line error and a non-zero exit, nothing generated."""

import subprocess
import sys
from pathlib import Path

import pytest

import generate
from checkpoint import CheckpointError, resolve_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def embedded_checkpoint():
    resolve_checkpoint(None)  # imported once, before any test times a run


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True, timeout=300)


def test_unknown_checkpoint_exits_with_one_line_listing_known_ones():
    r = run_cli("--checkpoint", "no-such-model")
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "smollm2-135m-instruct" in lines[0]


def test_empty_prompt_exits_with_one_line():
    r = run_cli("--prompt", "   ", "--max-new-tokens", "2")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: the prompt is empty"]


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["--kv", "kivi3"], "unknown --kv mode"),
    (["--kv", "kivi2", "--residual-length", "100"], "not a multiple of the group size"),
    (["--kv", "kivi2", "--group-size", "48", "--residual-length", "96"], "head_dim 64 is not a multiple of the group size 48"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "9000"], "exceeds the model's context of 8192"),
    (["--batch-size", "100000000"], "does not fit"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--kv", "kivi2,kivi4"], "runs one cache mode"),
    (["--seed", str(2**70)], "--seed must be in"),
])
def test_bad_values_raise_clear_errors_before_generating(argv, message, capsys):
    with pytest.raises(ValueError, match=message):
        generate.main(["--device", "cpu", *argv])
    assert capsys.readouterr().out == ""


def test_prompt_longer_than_context(tmp_path, capsys):
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("lorem ipsum dolor " * 6000)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate.main(["--device", "cpu", "--prompt-file", str(long_prompt), "--max-new-tokens", "1"])
    assert capsys.readouterr().out == ""


def test_missing_prompt_file_and_checkpoint_path(tmp_path):
    with pytest.raises(OSError):
        generate.main(["--device", "cpu", "--prompt-file", str(tmp_path / "absent.txt")])
    with pytest.raises(CheckpointError):
        generate.main(["--device", "cpu", "--checkpoint", str(tmp_path / "absent-dir")])


def test_batch_size_must_be_positive_or_auto():
    with pytest.raises(SystemExit):
        generate.parse_args(["--batch-size", "0"])
    assert generate.parse_args(["--batch-size", "auto"]).batch_size == "auto"


def test_generates_text_on_the_embedded_model():
    r = run_cli("--device", "cpu", "--kv", "kivi2", "--prompt", "The capital of France is", "--max-new-tokens", "8",
                "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is")
    assert len(r.stdout) > len("The capital of France is") + 5
    assert "decode:" in r.stderr and "kv cache (kivi2)" in r.stderr


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        generate.run_cli(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_interactive_chat_answers_each_line_and_ends_at_eof():
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--interactive", "--device", "cpu", "--max-new-tokens",
                        "6", "--temperature", "0"], input="Hello!\nName a color.\n", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    turns = r.stdout.split("> ")
    assert len(turns) == 4 and turns[0] == "" and turns[1].strip() and turns[2].strip() and turns[3] == "\n"


def test_interactive_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--interactive runs in one process"):
        generate.main(["--device", "cpu", "--interactive"])
