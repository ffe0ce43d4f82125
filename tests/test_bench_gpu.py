"""bench.gpu runs end to end at toy sizes on any machine, and writes its table."""

from __future__ import annotations

import pytest

from bench import gpu


def test_the_gpu_benchmark_runs_at_toy_sizes_and_writes_its_table(tmp_path):
    pytest.importorskip("ctranslate2")
    out = tmp_path / "RESULTS-gpu.md"
    gpu.main(
        [
            "--toy",
            "--dtypes",
            "bfloat16",
            "--rounds",
            "1",
            "--latency-rounds",
            "2",
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "models"),
        ]
    )
    rows = [line for line in out.read_text().splitlines() if line.startswith("| toy-")]
    subjects = {(row.split(" | ")[0][2:], row.split(" | ")[3]) for row in rows}
    bert = {s for m, s in subjects if m == "toy-bert"}
    assert bert == {
        "infinity",
        "worker",
        "sentence-transformers",
        "worker ctranslate2",
        "worker optimum",
    }
    assert {s for m, s in subjects if m == "toy-qwen3"} == {
        "infinity",
        "worker",
        "sentence-transformers",
    }
    # Three lengths for each subject, each with a rate, a ratio and a latency.
    assert len(rows) == 3 * (len(bert) + 3)
    for row in rows:
        rate, ratio, latency = (float(cell) for cell in row.strip(" |").split(" | ")[4:7])
        assert rate > 0 and ratio > 0 and latency > 0
