"""The engine's logits against Hugging Face transformers on the same weights."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import embedded_gguf, load_checkpoint, resolve_checkpoint
from model import build_model
from tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
        "from 1887 to 1889. Locally nicknamed \"La dame de fer\", it was constructed as the centrepiece "
        "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution.")


def engine_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    args, state_dict = load_checkpoint(path, "cpu", torch.float32)
    model = build_model(args, state_dict, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0]


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].float()


def test_embedded_model_matches_transformers_on_the_gguf(tmp_path):
    path = resolve_checkpoint(None)
    tokens = load_tokenizer(path).encode(TEXT, bos=False)
    ours = engine_logits(path, tokens)
    shutil.copy(embedded_gguf(), tmp_path / embedded_gguf().name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=embedded_gguf().name, dtype=torch.float32)
    theirs = hf_logits(hf, tokens)
    assert len(tokens) > 64
    assert (ours - theirs).abs().max().item() < 1e-2
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope_scaling, max_positions", [
    (None, 512), (LLAMA3, 512), ({"rope_type": "linear", "factor": 4.0}, 512), ({"rope_type": "dynamic", "factor": 4.0}, 64),
], ids=["default", "llama3", "linear", "dynamic"])
def test_converted_random_hf_checkpoint_matches_transformers(tmp_path, rope_scaling, max_positions):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, rope_theta=50000.0, rope_scaling=rope_scaling,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(tokenizer_json())
    subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hf_checkpoint.py"), "--hf-dir", str(tmp_path / "hf"),
                    "--out", str(tmp_path / "engine")], check=True, capture_output=True)
    # past original_max_position_embeddings (llama3) and max_position_embeddings (dynamic): scaling matters
    tokens = torch.randint(0, 256, (200,)).tolist()
    ours = engine_logits(tmp_path / "engine", tokens)
    theirs = hf_logits(hf, tokens)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def tokenizer_json() -> str:
    """A byte-level BPE tokenizer.json with no merges: enough for the converter to copy."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={chr(i): i for i in range(33, 127)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    return tok.to_str()
