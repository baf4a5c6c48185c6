"""oneref.benchmark (scripts/benchmark.py) runs the real training and evaluation steps: a smoke test on the tiny model
(fields only, never values: the benchmark is the measurement)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oneref import benchmark

ROW_FIELDS = {
    "bench", "mode", "size", "task", "batch", "precision", "compile", "grad_ckpt", "attention", "text",
    "samples_per_s", "ms_per_step_median", "fwd_gflops_per_sample", "tflops_per_s", "mfu", "device",
    "torch", "git_commit", "steps", "warmup", "text_ids_mean", "speedup_vs_official", "machine",
}  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("command", ["train", "infer"])
def test_benchmark_runs_the_real_step_and_writes_one_json_line_per_configuration(
    tmp_path: Path, command: str
) -> None:
    out = tmp_path / "bench.jsonl"
    argv = [command, "--size", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--batches", "1"]
    argv += ["--device", "cpu", "--text", "realistic", "--text-buckets", "16", "32", "64", "--out", str(out)]
    assert benchmark.main(argv) == 0
    rows = _rows(out)
    assert [(r["mode"], r["text"]) for r in rows] == [("official", "64"), ("ours", "realistic")]
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["bench"] == command and r["size"] == "tiny" and r["batch"] == 4
        assert "max_rss_gib" in r  # the CPU's memory figure (peak_mem_gib on CUDA)
    official, ours = rows
    assert official["text_ids_mean"] == 64 and official["precision"] == "32-true"
    assert ours["text_ids_mean"] in (16, 32, 64)  # padded to a bucket
    assert official["speedup_vs_official"] == 1.0


def test_benchmark_mrefm_times_the_pretraining_step(tmp_path: Path) -> None:
    out = tmp_path / "m.jsonl"
    args = ["mrefm", "--size", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--device", "cpu"]
    assert benchmark.main([*args, "--modes", "ours", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["bench"], row["task"], row["batch"]) == ("mrefm", "mrefm", 4) and row["samples_per_s"] > 0


def test_benchmark_rejects_a_bad_text_length(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--text 200"):
        benchmark.main(["train", "--size", "tiny", "--modes", "ours", "--text", "200", "--device", "cpu"])


def test_every_runner_is_registered_once_with_its_options() -> None:
    assert list(benchmark.RUNNERS) == ["data", "records", "train", "infer", "mrefm", "all"]
    with pytest.raises(ValueError, match="already registered"):
        benchmark.register(benchmark.RUNNERS["data"])


def test_synthetic_batches_are_refcollate_batches() -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    lengths = benchmark.text_lengths("realistic", 3, gen)
    batch = benchmark.synthetic_batch(3, 32, 50, lengths, None, [16, 32, 64], gen)
    assert batch["image"].shape == (3, 3, 32, 32) and batch["text_ids"].shape[1] in (16, 32, 64)
    assert batch["text_padding_mask"].sum(1).tolist() == (batch["text_ids"].shape[1] - lengths).tolist()
    official = benchmark.synthetic_batch(3, 32, 50, lengths, benchmark.OFFICIAL_TEXT_LEN, None, gen)
    assert official["text_ids"].shape[1] == benchmark.OFFICIAL_TEXT_LEN


def test_data_benchmark_times_the_same_records_in_every_annotation_format(tmp_path: Path) -> None:
    out = tmp_path / "data.jsonl"
    argv = ["data", "--samples", "16", "--num-images", "4", "--image-size", "96x64", "--img-size", "64"]
    argv += ["--batch-size", "8", "--round-size", "8", "--loader-workers", "--formats", "refer", "mdetr"]
    assert benchmark.main([*argv, "--out", str(out)]) == 0
    rows = [r for r in _rows(out) if r.get("format")]
    assert {r["format"] for r in rows} == {"oneref", "refer", "mdetr"}
    assert all(r["samples"] == 16 and r["samples_per_s_cpu_best"] > 0 for r in rows)
