"""The whole path on Multi30k, as a user runs it: smoke training, translation, scoring."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import pytest
import sacrebleu

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run(*args: str, stdin: bytes | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, input=stdin, capture_output=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, request):
    multi30k = request.getfixturevalue("multi30k_dir")
    run_dir = tmp_path_factory.mktemp("smoke")
    cache = tmp_path_factory.mktemp("cache")
    proc = run(
        "-m",
        "nmt.train",
        "+experiment=smoke",
        f"data.dir={multi30k}",
        f"data.cache_dir={cache}",
        f"run_dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return run_dir, proc.stdout.decode() + proc.stderr.decode(), multi30k


@pytest.fixture(scope="module")
def multi30k_dir():  # module-scoped twin of the conftest fixture
    from tests.conftest import MULTI30K
    from tests.data_fixtures import multi30k_missing

    if MULTI30K is None:
        pytest.skip(multi30k_missing())
    return MULTI30K


def test_smoke_training_leaves_checkpoint_and_tensorboard(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, output, _ = smoke_run
    assert (run_dir / "checkpoints" / "best.pt").exists()
    assert (run_dir / "checkpoints" / "latest.pt").exists()
    assert (run_dir / "config.yaml").exists()
    assert "done:" in output and "best valid bleu" in output
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "valid/bleu"} <= tags
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses[-1] < losses[0], "training loss goes down"


def test_translate_writes_one_line_per_input_and_scores(smoke_run, tmp_path):
    run_dir, _, multi30k = smoke_run
    src = gzip.decompress((multi30k / "test_2016_flickr.en.gz").read_bytes())
    ref_path = tmp_path / "ref.de"
    ref_path.write_bytes(gzip.decompress((multi30k / "test_2016_flickr.de.gz").read_bytes()))
    out_path = tmp_path / "hyp.de"
    proc = run(
        "-m",
        "nmt.translate",
        "--ckpt",
        str(run_dir / "checkpoints" / "best.pt"),
        "--beam",
        "2",
        "--output",
        str(out_path),
        "--ref",
        str(ref_path),
        stdin=src,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    hyps = out_path.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(hyps) == 1000
    err = proc.stderr.decode()
    assert "BLEU" in err and "chrF" in err and "nrefs:1|case:mixed|eff:no|tok:13a" in err
    refs = ref_path.read_text(encoding="utf-8").split("\n")[:-1]
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert f"{expected:.2f}" in err
