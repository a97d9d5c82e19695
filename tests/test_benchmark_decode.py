"""scripts/benchmark_decode.py: nmt's side counts the same work whether batches run one at a time
or side by side (each batch's decoder steps are counted on the thread that decodes it)."""

from __future__ import annotations

from script_loader import load_script

from tests.test_translator import SENTENCES, make_checkpoint

benchmark_decode = load_script("benchmark_decode")


def test_parallel_batches_count_the_same_steps_and_tokens(tmp_path, torch_threads):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    data = tmp_path / "data"
    data.mkdir()
    (data / "test_2016_flickr.en").write_text("\n".join(SENTENCES * 3) + "\n", encoding="utf-8")
    args = ["--ckpt", str(ckpt), "--data-dir", str(data), "--src-lang", "en", "--no-hf"]
    args += ["--beams", "1,3", "--repeat", "2", "--batch-size", "4", "--threads", "2", "--malloc", "default"]
    reports = {w: benchmark_decode.main([*args, "--workers", str(w)]) for w in (1, 2)}  # sets 2 threads
    assert reports[1]["meta"]["workers"] == 1 and reports[2]["meta"]["workers"] == 2
    counted = {
        w: [(r["search"], r["sentences"], r["target_tokens"], r["decoder_steps"]) for r in report["results"]]
        for w, report in reports.items()
    }
    assert counted[1] == counted[2]
    greedy, beam = counted[1]
    assert greedy[1] == beam[1] == len(SENTENCES) * 3  # every sentence, 6 batches of at most 4
    # Each batch is decoded for at least one step, and every sentence ends with EOS.
    assert greedy[3] >= 6 and beam[3] >= 6 and greedy[2] >= len(SENTENCES) * 3
    for report in reports.values():
        for r in report["results"]:
            assert len(r["pass_seconds"]) == 2 and r["seconds"] == min(r["pass_seconds"]) > 0
