"""`pip install -e .` installs the kivi-fast distribution: its modules import from anywhere,
its commands are on the venv's PATH, and the checkout is left as it was."""

import importlib.metadata
import importlib.util
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build_artifacts() -> set[str]:
    return {p.name for p in ROOT.iterdir() if p.name.endswith(".egg-info") or p.name == "build"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway venv seeing this interpreter's packages, with the checkout installed
    editable, offline (no build isolation, no dependencies)."""
    if importlib.util.find_spec("pip") is None or importlib.util.find_spec("venv") is None:
        pytest.skip("needs pip and venv")
    try:
        setuptools = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pytest.skip("needs setuptools")
    if setuptools < (64, 0):
        pytest.skip("editable installs from pyproject.toml need setuptools >= 64")
    env_dir = tmp_path_factory.mktemp("venv")
    # without its own pip and setuptools (older ones, from ensurepip), the venv uses this interpreter's
    made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a venv: {made.stderr.strip()}")
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # when this one is a venv too
    before = build_artifacts()
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    r = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
                       capture_output=True, text=True, cwd=env_dir, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert build_artifacts() == before
    return env_dir


def test_editable_install_imports_from_anywhere(venv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import importlib.metadata, generate, kernels, checkpoint; print(importlib.metadata.version('kivi-fast')); "
            "print(generate.__file__); print(kernels.__file__); print(checkpoint.CHECKPOINTS_DIR)")
    r = subprocess.run([venv / "bin" / "python", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["0.1.0", str(ROOT / "generate.py"), str(ROOT / "kernels" / "__init__.py"),
                                     str(ROOT / "checkpoints")]
    assert (venv / "bin" / "kivi-generate").is_file() and (venv / "bin" / "kivi-batch").is_file()


def test_a_script_using_the_engine_prints_what_the_command_prints(venv, tmp_path):
    """Greedy text of engine.LLM from a script outside the checkout equals kivi-generate's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    prompt = "The key to a good night's sleep is"
    script = tmp_path / "mine.py"
    script.write_text("from engine import LLM\n"
                      "llm = LLM(kv='kivi2', device='cpu')\n"
                      f"print(llm.generate([{prompt!r}], max_new_tokens=12, temperature=0)[0].text)\n")
    mine = subprocess.run([venv / "bin" / "python", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert mine.returncode == 0, mine.stderr
    command = subprocess.run([venv / "bin" / "kivi-generate", "--kv", "kivi2", "--device", "cpu", "--temperature", "0",
                              "--max-new-tokens", "12", "--prompt", prompt], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=300)
    assert command.returncode == 0, command.stderr
    assert command.stdout == prompt + mine.stdout
