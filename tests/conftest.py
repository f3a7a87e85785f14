import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from checkpoint import embedded_gguf, import_gguf  # noqa: E402


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors: one intra-op thread; several spin-waiting threads on 2 shared cores make
    these tests ten times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded GGUF imported once per session (about 10 s). Tests that only need a real
    checkpoint, not the import itself, should use resolve_checkpoint(None), shared in checkpoints/."""
    out = tmp_path_factory.mktemp("import") / "smollm2"
    import_gguf(embedded_gguf(), out)
    return out
