"""SIGTERM / SIGINT during ``python -m nmt.train``: finish the step, save, exit 128 + signum; resume from there."""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, tiny_config
from tests.test_config import child_env, cli_overrides, run_train

pytestmark = pytest.mark.slow

STEP_LINE = re.compile(r"step (\d+)/")


def wait_for_step(proc: subprocess.Popen, log: Path, step: int, timeout: float = 120) -> int:
    """Poll the run's output until it has logged ``step`` (or more); return the step last logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(s) for s in STEP_LINE.findall(log.read_text())]
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            pytest.fail(
                f"training ended (rc {proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_the_step_reached_exits_128_plus_signum_and_resume_continues(toy_dir, tmp_path, signum):
    # A run far too long to end by itself: only the signal stops it.
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=100_000, log_every=1, valid_every=100_000)
    log = tmp_path / "out.txt"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nmt.train", *cli_overrides(cfg)],
            cwd=REPO,
            env=child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            seen = wait_for_step(proc, log, 3)
            proc.send_signal(signum)
            rc = proc.wait(timeout=60)
        finally:
            proc.kill()  # only if still running (a failed assertion above)
    output = log.read_text()
    assert rc == 128 + signum, output[-3000:]  # saved, but not done: 130 or 143
    assert f"received {signum.name}" in output
    stopped = re.search(
        r"done: interrupted by a signal \| step (\d+) \| not validated yet \| checkpoint (.*)", output
    )
    assert stopped, output[-3000:]
    assert stopped.group(2) == str(tmp_path / "run" / "checkpoints" / "latest.pt")
    step = int(stopped.group(1))
    assert seen <= step < 100_000
    assert "Traceback" not in output

    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["train_state"]["step"] == step
    assert len(ckpt["train_state"]["losses"]) == step

    resumed_cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, max_steps=step + 3, resume="true")
    )
    proc2 = run_train(*cli_overrides(resumed_cfg))
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    out2 = proc2.stdout
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'latest.pt'} at step {step}" in out2
    assert [int(s) for s in STEP_LINE.findall(out2)] == [step + 1, step + 2, step + 3]
    assert f"done: reached train.max_steps={step + 3} | step {step + 3}" in out2
    after = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert after["train_state"]["step"] == step + 3
    assert after["train_state"]["losses"][:step] == ckpt["train_state"]["losses"], "history kept"


def test_a_second_ctrl_c_stops_at_once_and_a_second_sigterm_does_not(toy_dir, tmp_path):
    from nmt.data.corpus import prepare_data
    from nmt.trainer import Trainer

    cfg = tiny_config(toy_dir, tmp_path / "run")
    trainer = Trainer(cfg, prepare_data(cfg.data), Path(cfg.run_dir))
    trainer._handle_signal(signal.SIGTERM, None)
    trainer._handle_signal(signal.SIGTERM, None)  # still the graceful stop
    assert trainer._stop_signal == signal.SIGTERM
    trainer._stop_signal = None
    trainer._handle_signal(signal.SIGINT, None)
    assert trainer._stop_signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        trainer._handle_signal(signal.SIGINT, None)
