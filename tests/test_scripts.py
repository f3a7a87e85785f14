"""The benchmark and retrieval scripts run end to end on CPU and write their JSON and PNG."""

import json
import sys
from pathlib import Path

import pytest
import torch

from kivi_cache import CacheConfig
from model import ModelArgs, Transformer
from planner import planned_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import benchmark  # noqa: E402
import eval_needle  # noqa: E402


def test_benchmark_runs_points_and_reports_what_does_not_fit(tmp_path):
    shape = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=64, max_seq_len=256)
    (tmp_path / "tiny").mkdir()
    shape.save(tmp_path / "tiny" / "config.json")
    seq_len = 12 + 6
    budget = max(planned_bytes(shape, CacheConfig(m), seq_len, torch.float32, 3) for m in ("fp16", "kivi2"))
    out = tmp_path / "bench"
    benchmark.main(["--checkpoint", str(tmp_path / "tiny"), "--random-weights", "--kv", "fp16,kivi2", "--device", "cpu",
                    "--prompt-len", "12", "--gen-len", "6", "--batch-size", "1,100000,auto",
                    "--memory-budget", str(budget / 1e9), "--out", str(out)])
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert out.with_suffix(".png").stat().st_size > 1000
    by_point = {(r["kv"], r["batch_size"]): r for r in results}
    assert not by_point[("fp16", 100000)]["fits"] and "tokens_per_s" not in by_point[("fp16", 100000)]
    for mode in ("fp16", "kivi2"):
        assert by_point[(mode, 1)]["tokens_per_s"] > 0
        auto = next(r for r in results if r["kv"] == mode and r["auto"])
        assert auto["batch_size"] >= 3 and auto["tokens_per_s"] > 0

    # A second run on the same --out keeps the first run's points and adds its own.
    common = ["--checkpoint", str(tmp_path / "tiny"), "--random-weights", "--device", "cpu", "--prompt-len", "12",
              "--memory-budget", str(budget / 1e9), "--out", str(out)]
    benchmark.main(common + ["--kv", "kivi4,fp16", "--gen-len", "6", "--batch-size", "1"])
    again = json.loads(out.with_suffix(".json").read_text())["results"]
    assert {(r["kv"], r["batch_size"]) for r in again} == set(by_point) | {("kivi4", 1)}
    assert next(r for r in again if (r["kv"], r["batch_size"]) == ("fp16", 1)) == by_point[("fp16", 1)]
    with pytest.raises(ValueError, match="other settings"):
        benchmark.main(common + ["--kv", "fp16", "--gen-len", "7", "--batch-size", "1"])


def test_benchmark_skip_prefill_decodes_from_the_prompt_length_without_a_forward(tmp_path, monkeypatch):
    shape = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=64, max_seq_len=256)
    (tmp_path / "tiny").mkdir()
    shape.save(tmp_path / "tiny" / "config.json")
    forwards = []
    original = Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, tokens, *a, **k: forwards.append(tokens.shape) or
                        original(self, tokens, *a, **k))
    out = tmp_path / "bench"
    benchmark.main(["--checkpoint", str(tmp_path / "tiny"), "--random-weights", "--kv", "kivi2", "--device", "cpu",
                    "--prompt-len", "150", "--gen-len", "5", "--batch-size", "2", "--skip-prefill", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["skip_prefill"] and data["results"][0]["tokens_per_s"] > 0
    assert set(forwards) == {(2, 1)}  # decode steps only


def test_needle_eval_runs_on_the_embedded_model(tmp_path):
    out = tmp_path / "needle"
    essays = tmp_path / "essays"
    essays.mkdir()
    (essays / "a.txt").write_text("Paul wrote essays about startups. They were long. " * 60)
    eval_needle.main(["--kv", "fp16,kivi2", "--lengths", "160,200", "--depths", "0,1", "--max-new-tokens", "6",
                      "--device", "cpu", "--essays", str(essays), "--out-dir", str(out)])
    records = json.loads((out / "needle.json").read_text())
    assert len(records) == 2 * 2 * 2 * 2  # modes x lengths x depths x tasks
    assert {r["task"] for r in records} == {"needle", "passkey"}
    assert all(r["correct"] in (0, 1) for r in records)
    for mode in ("fp16", "kivi2"):
        assert (out / f"needle_{mode}.png").stat().st_size > 1000
