"""scripts/benchmark_loss.py: a short run's table and JSON, and what it measures about the two losses."""

from __future__ import annotations

import json

import pytest
from script_loader import load_script

benchmark_loss = load_script("benchmark_loss")

RUN = [
    "--vocab",
    "300",
    "--tokens",
    "240",
    "--mean-len",
    "12",
    "--warmup",
    "1",
    "--steps",
    "3",
    "--threads",
    "1",
]


def test_run_writes_json_and_compiled_loss_keeps_no_float32_copy(tmp_path, capsys):
    out = tmp_path / "loss.json"
    result = benchmark_loss.main([*RUN, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    eager, compiled = result["results"]["eager"], result["results"]["compiled"]
    assert len(eager["times_ms"]) == len(compiled["times_ms"]) == 3
    assert eager["positions_per_sec"] > 0 and compiled["positions_per_sec"] > 0
    # Eager keeps float32 log-probabilities of every position of the last batch; compiled keeps the
    # bf16 logits (not counted), the target and a few numbers per row.
    batch, length, vocab = result["meta"]["last_shape"]
    assert eager["saved_beyond_logits_bytes"] >= batch * length * vocab * 4
    assert compiled["saved_beyond_logits_bytes"] < batch * length * 32
    assert (eager["graphs"], compiled["graphs"]) == (0, 1)  # one graph for the four batch shapes
    assert compiled["max_rel_diff"] < 1e-5
    assert "compiled / eager speed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["--impl", "fused"], ["--tokens", "10"], ["--steps", "0"], ["--device", "cuda", "--impl", ""]],
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        benchmark_loss.parse_args(argv)
