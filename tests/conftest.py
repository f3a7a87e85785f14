import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from checkpoint import embedded_gguf, import_gguf  # noqa: E402


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded GGUF imported once per session (about 10 s). Tests that only need a real
    checkpoint, not the import itself, should use resolve_checkpoint(None), shared in checkpoints/."""
    out = tmp_path_factory.mktemp("import") / "smollm2"
    import_gguf(embedded_gguf(), out)
    return out
