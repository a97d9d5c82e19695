"""DDP on CPU: ``torchrun --nproc_per_node=2 -m nmt.train`` with gloo on a toy corpus.

What is proven, from what each process itself reports (not from rank 0's word alone): both ranks take
the same steps and end with the same weights; only rank 0 writes into the run directory; the losses
are finite; and a run stopped at step k resumes under DDP from step k.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_config, write_toy_corpus
from tests.test_config import child_env, cli_overrides

pytestmark = pytest.mark.slow

STOP, TOTAL = 6, 10  # first run stops at STOP; the resumed run continues to TOTAL
RANK_LINE = re.compile(r"rank (\d+): steps (\d+) -> (\d+) \| last loss (\S+) \| weight checksum (\S+)")

# Imported by every Python process of the run (PYTHONPATH): each torchrun worker records, in its own
# file, its pid and every file it moves into place (atomic writes: checkpoints, links, tokenizer).
AUDIT = """
import os
if os.environ.get("NMT_AUDIT_DIR") and "RANK" in os.environ:
    _log = os.path.join(os.environ["NMT_AUDIT_DIR"], "rank%s.txt" % os.environ["RANK"])
    with open(_log, "a") as f:
        f.write("pid %d\\n" % os.getpid())

    def _audited(fn):
        def wrapper(src, dst, *args, **kwargs):
            with open(_log, "a") as f:
                f.write("%s %s\\n" % (fn.__name__, os.path.abspath(dst)))
            return fn(src, dst, *args, **kwargs)
        return wrapper

    os.replace = _audited(os.replace)
    os.link = _audited(os.link)
"""


@dataclasses.dataclass
class DDPRun:
    run_dir: Path
    proc: subprocess.CompletedProcess
    audit: dict[int, list[str]]  # rank -> lines its process recorded

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def ranks(self) -> dict[int, tuple[int, int, float, float]]:
        """rank -> (first step, last step, last loss, weight checksum), as each rank reported them."""
        rows = {}
        for rank, first, last, loss, checksum in RANK_LINE.findall(self.proc.stdout):
            rows[int(rank)] = (int(first), int(last), float(loss), float(checksum))
        return rows

    def pid(self, rank: int) -> int:
        return int(next(line.split()[1] for line in self.audit[rank] if line.startswith("pid ")))

    def moved_into_run_dir(self, rank: int) -> list[str]:
        root = str(self.run_dir.resolve())
        return [line.split(" ", 1)[1] for line in self.audit[rank] if line.split(" ", 1)[1].startswith(root)]


def torchrun(cfg, tmp: Path, tag: str) -> Callable[[], DDPRun]:
    """Start ``torchrun --nproc_per_node=2 -m nmt.train`` on ``cfg``; the returned function waits for it."""
    audit_dir = tmp / f"audit-{tag}"
    audit_dir.mkdir()
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT)
    env = {**child_env(), "NMT_AUDIT_DIR": str(audit_dir), "PYTHONPATH": f"{site}:{REPO}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*command, "-m", "nmt.train", *cli_overrides(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def wait() -> DDPRun:
        try:
            stdout, stderr = proc.communicate(timeout=180)
        finally:
            proc.kill()  # only if it is still running after the timeout
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        audit = {int(p.stem[4:]): p.read_text().splitlines() for p in audit_dir.glob("rank*.txt")}
        assert sorted(audit) == [0, 1], "both workers ran with the audit"
        return DDPRun(Path(cfg.run_dir), subprocess.CompletedProcess(proc.args, 0, stdout, stderr), audit)

    return wait


def train_changes(cfg, **changes):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A DDP run stopped at STOP, its resumption to TOTAL, and a run straight to TOTAL."""
    tmp = tmp_path_factory.mktemp("ddp")
    toy = write_toy_corpus(tmp / "toy")
    cut = tiny_config(toy, tmp / "cut", max_steps=STOP, log_every=1)
    # The straight run is independent of the other two: let it run beside them (with its own cache).
    straight_cfg = tiny_config(toy, tmp / "straight", max_steps=TOTAL, log_every=1)
    straight_cfg = dataclasses.replace(
        straight_cfg, data=dataclasses.replace(straight_cfg.data, cache_dir=str(tmp / "straight-cache"))
    )
    straight = torchrun(straight_cfg, tmp, "straight")
    first = torchrun(cut, tmp, "first")()
    resumed = torchrun(train_changes(cut, max_steps=TOTAL, resume="true"), tmp, "resumed")()
    return first, resumed, straight()


def test_both_ranks_take_the_same_steps_and_hold_the_same_weights(runs):
    first, _, _ = runs
    assert "world size 2" in first.output
    ranks = first.ranks()
    assert sorted(ranks) == [0, 1], first.proc.stdout[-3000:]
    assert [ranks[r][:2] for r in (0, 1)] == [(0, STOP), (0, STOP)]
    assert ranks[0][3] == ranks[1][3], "DDP replicas drifted apart"
    assert ranks[0][2] != ranks[1][2], "each rank trains on its own shard of the data"
    assert f"done: reached train.max_steps={STOP} | step {STOP}" in first.output


def test_losses_are_finite_on_every_rank(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in runs:
        assert all(math.isfinite(row[2]) for row in run.ranks().values())
        assert "non-finite" not in run.output and "step skipped" not in run.output
    # rank 0's TensorBoard log of the stopped and the resumed run (the same run directory)
    events = EventAccumulator(str(runs[0].run_dir / "tb"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == list(range(1, TOTAL + 1))
    assert all(math.isfinite(e.value) for e in scalars)


def test_only_rank_0_writes_checkpoints_and_tensorboard(runs):
    for run in runs:
        ckpt = str((run.run_dir / "checkpoints" / "latest.pt").resolve())
        assert ckpt in run.moved_into_run_dir(0), "the audit sees rank 0 save its checkpoint"
        assert run.moved_into_run_dir(1) == [], "rank 1 wrote into the run directory"
    first, resumed, _ = runs
    # One event file per run, named after the process that wrote it: rank 0 of each run.
    event_files = sorted((first.run_dir / "tb").glob("events.out.tfevents.*"))
    assert {int(p.name.split(".")[-2]) for p in event_files} == {first.pid(0), resumed.pid(0)}
    assert len(event_files) == 2


def test_resume_under_ddp_continues_from_the_checkpoint_step(runs):
    _, resumed, _ = runs
    ranks = resumed.ranks()
    assert [ranks[r][:2] for r in (0, 1)] == [(STOP, TOTAL), (STOP, TOTAL)]
    assert f"resumed from {resumed.run_dir / 'checkpoints' / 'latest.pt'} at step {STOP}" in resumed.output
    assert f"step {STOP + 1}/{TOTAL}" in resumed.output and "step 1/" not in resumed.output
    assert f"done: reached train.max_steps={TOTAL} | step {TOTAL}" in resumed.output


def test_resume_under_ddp_is_exact(runs):
    """Stopping at STOP and resuming ends with the same weights as running straight to TOTAL."""
    _, resumed, straight = runs
    assert [straight.ranks()[r][:2] for r in (0, 1)] == [(0, TOTAL), (0, TOTAL)]
    assert resumed.ranks()[0][2:] == straight.ranks()[0][2:]
    assert resumed.ranks()[1][2:] == straight.ranks()[1][2:]


def test_each_rank_draws_its_own_dropout_masks(runs):
    # With one seed on every rank, every rank would draw the same dropout masks. The seed a generator
    # was last seeded with opens its saved state (8 bytes, int64), so the checkpoint shows it per rank.
    import torch

    first, _, _ = runs
    state = torch.load(first.run_dir / "checkpoints" / "latest.pt", weights_only=True)
    seeds = [int(rank["torch"][:8].view(torch.int64)) for rank in state["rng_per_rank"]]
    assert len(seeds) == 2 and seeds[0] != seeds[1], seeds


def _disagreeing_rank(rank: int, port: int, cfg, results: str, scenario: str) -> None:
    """One gloo rank of a two-rank Trainer that disagrees with the other (see the test below)."""
    import faulthandler
    import json
    import os

    import torch
    import torch.distributed as dist

    from nmt.data.corpus import prepare_data
    from nmt.distributed import DistInfo
    from nmt.trainer import Trainer

    faulthandler.dump_traceback_later(90, exit=True)  # a deadlock fails the test instead of hanging it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    trainer = Trainer(cfg, prepare_data(cfg.data), Path(cfg.run_dir), dist=DistInfo(rank, 0, 2))
    import nmt.trainer

    any_flags, stop_checks = nmt.trainer.any_flags, []  # collectives that only agree on stopping
    nmt.trainer.any_flags = lambda *args: stop_checks.append(1) or any_flags(*args)
    if scenario == "nan_on_one_rank":
        # fp16 on CUDA turns the gradient scaler on; the scaler skips an update with inf gradients itself.
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, enabled=True)
        loss_of, calls = trainer._loss, [0]

        def loss(model, batch, *args):
            loss_sum, nll_sum = loss_of(model, batch, *args)
            if model is trainer.model:
                calls[0] += 1
                if rank == 1 and calls[0] == 2:
                    loss_sum = loss_sum * float("nan")  # this rank's batch overflowed
            return loss_sum, nll_sum

        trainer._loss = loss
    elif scenario == "signal_on_one_rank":  # e.g. a scheduler's SIGTERM that reached one node first
        import signal

        loss_of, calls = trainer._loss, [0]

        def loss(model, batch, *args):
            calls[0] += 1
            if rank == 1 and calls[0] == 3:
                trainer._handle_signal(signal.SIGTERM, None)
            return loss_of(model, batch, *args)

        trainer._loss = loss
    elif scenario == "validation_fails":  # on rank 0, the only one that validates

        def fail(*args):
            raise RuntimeError("decoding ran out of memory")

        trainer.validator.run = fail
    elif scenario == "save_fails":  # rank 0 writes the checkpoints: its disk is full
        import nmt.trainer
        from nmt.checkpoint import CheckpointError

        def full(*args):
            error = CheckpointError("could not write latest.pt (No space left on device)")
            error.no_space = True  # as nmt.checkpoint marks a full disk
            raise error

        nmt.trainer.save_run_checkpoint = full
    else:  # "clocks_apart": rank 0 starts with most of the time limit used up
        trainer.state.elapsed_sec = 0.9 * cfg.train.max_time_min * 60 if rank == 0 else 0.0
    try:
        result = trainer.train()
        outcome = [result.state.step, result.stop_reason]
    except Exception as e:
        outcome = [trainer.state.step, f"{type(e).__name__}: {e}"]
    Path(results, f"rank{rank}.json").write_text(json.dumps(outcome))
    Path(results, f"rank{rank}-stop-checks.txt").write_text(str(len(stop_checks)))
    dist.destroy_process_group()
    _leave()


def _leave() -> None:
    """End a spawned rank as nmt.train ends a finished torchrun worker: without the interpreter's
    teardown, where a gloo thread sometimes aborts the process ("terminate called without an active
    exception", SIGABRT) after its work is done and its result written."""
    from nmt.train import exit_finished_worker

    exit_finished_worker()


@pytest.mark.parametrize("scenario", ["nan_on_one_rank", "clocks_apart", "signal_on_one_rank"])
def test_ranks_that_disagree_still_stop_together(tmp_path, scenario):
    """A non-finite loss on one rank only, one rank's clock passing train.max_time_min first, or one
    rank receiving SIGTERM: every rank must skip or stop at the same step, or they wait forever in
    collectives that never match."""
    import json
    import socket

    import torch.multiprocessing as mp

    from nmt.data.corpus import prepare_data

    toy = write_toy_corpus(tmp_path / "toy")
    limits = dict(max_steps=10_000, max_time_min=0.05) if scenario == "clocks_apart" else dict(max_steps=8)
    cfg = tiny_config(toy, tmp_path / "run", valid_every=10_000, keep_last=0, **limits)
    prepare_data(cfg.data)  # fill the cache once, before the ranks read it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_disagreeing_rank, args=(port, cfg, str(tmp_path), scenario), nprocs=2, join=True)
    steps = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert steps[0] == steps[1], steps
    # The ranks agree on stopping through the all-reduce of each step read: a collective of its own
    # only before the first step and after it (that step is read during the second).
    assert [(tmp_path / f"rank{r}-stop-checks.txt").read_text() for r in (0, 1)] == ["2", "2"]
    if scenario == "nan_on_one_rank":
        assert steps[0] == [8, "reached train.max_steps=8"]
    elif scenario == "signal_on_one_rank":  # signalled in step 3; each rank then saved and stopped
        from nmt.checkpoint import load_checkpoint

        assert steps[0][1] == "interrupted by a signal" and 3 <= steps[0][0] < 8, steps
        saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
        assert saved["train_state"]["step"] == steps[0][0]
    else:
        assert steps[0][1] == "reached train.max_time_min=0.05"


@pytest.mark.parametrize("scenario", ["validation_fails", "save_fails"])
def test_rank_0_failing_to_validate_or_save_stops_every_rank_with_its_reason(tmp_path, scenario):
    """Only rank 0 validates and writes checkpoints: when either fails, it stops (having saved, if it
    could), and the other ranks, which waited for it, stop with its reason instead of a broken
    connection."""
    import json
    import socket

    import torch.multiprocessing as mp

    from nmt.data.corpus import prepare_data

    toy = write_toy_corpus(tmp_path / "toy")
    cfg = tiny_config(toy, tmp_path / "run", valid_every=3, max_steps=8)
    prepare_data(cfg.data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_disagreeing_rank, args=(port, cfg, str(tmp_path), scenario), nprocs=2, join=True)
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    if scenario == "validation_fails":
        reason = "decoding ran out of memory"
        assert outcomes[0] == [3, f"RuntimeError: {reason}"], outcomes
        assert (tmp_path / "run" / "checkpoints" / "step_00000003.pt").exists(), "the state was saved first"
    else:
        reason = (
            "step 3 was not saved: could not write latest.pt (No space left on device). No checkpoint of "
            "this run was written; make room and start it again."
        )
        assert outcomes[0] == [3, f"TrainingError: {reason}"], outcomes
    assert outcomes[1] == [3, f"TrainingError: rank 0 stopped: {reason}"], outcomes


def _rank_of_train_run(rank: int, port: int, cfgs: list, results: str) -> None:
    """Rank ``rank`` of a two-rank ``nmt.train.run`` on ``cfgs[rank]``, as torchrun would start it."""
    import faulthandler
    import os

    import torch

    from nmt.data.sources import DataError
    from nmt.train import run
    from nmt.trainer import TrainingError

    faulthandler.dump_traceback_later(90, exit=True)  # a deadlock fails the test instead of hanging it
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        run(cfgs[rank])
        outcome = "trained"
    except (TrainingError, DataError) as e:  # what nmt.train.main prints as one line, exit code 2
        outcome = f"error: {e}"
    Path(results, f"rank{rank}.txt").write_text(outcome)
    _leave()


def _spawn_two_ranks(cfgs: list, results: Path) -> list[str]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_of_train_run, args=(port, cfgs, str(results)), nprocs=2, join=True)
    return [(results / f"rank{r}.txt").read_text() for r in (0, 1)]


def test_a_rank_with_another_copy_of_the_corpus_stops_every_rank(tmp_path):
    """Nodes without a shared filesystem read their own copies; one that differs must not train."""
    import shutil

    toy = write_toy_corpus(tmp_path / "toy")
    other = shutil.copytree(toy, tmp_path / "other-node" / "toy")
    lines = (other / "train.de").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[7] = "ein anderer Satz\n"  # one line of 400 differs on the second node
    (other / "train.de").write_text("".join(lines), encoding="utf-8")
    cfg = tiny_config(toy, tmp_path / "run", max_steps=2)
    cfgs = [
        cfg,
        dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, dir=str(other), cache_dir=str(other / ".cache"))
        ),
    ]
    outcomes = _spawn_two_ranks(cfgs, tmp_path)
    assert outcomes[0] == outcomes[1], outcomes  # the same error on both ranks, at the same point
    message = outcomes[0]
    assert message.startswith("error: the ranks would not train the same model: rank 1 on "), message
    assert "data '" in message and "step" not in message and "weights" not in message, message
    assert not (tmp_path / "run" / "checkpoints").exists(), "no step was trained"

    # The same copies on both nodes (separate folders, separate caches) train: nothing needs sharing.
    same = tmp_path / "same-node" / "toy"
    shutil.copytree(toy, same)
    cfgs[1] = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, dir=str(same), cache_dir=str(same / ".c"))
    )
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    assert _spawn_two_ranks(cfgs, tmp_path) == ["trained", "trained"]


def test_bad_data_stops_every_rank_with_rank_0s_message(tmp_path):
    """Rank 0 reads the corpus first (tokenizer, encoding cache) while the others wait: when it cannot,
    they stop with its reason, not with a broken connection."""
    toy = write_toy_corpus(tmp_path / "toy")
    lines = (toy / "train.de").read_text(encoding="utf-8").splitlines(keepends=True)
    (toy / "train.de").write_text("".join(lines[:-1]), encoding="utf-8")  # 399 lines against 400
    cfg = tiny_config(toy, tmp_path / "run", max_steps=2)
    outcomes = _spawn_two_ranks([cfg, cfg], tmp_path)
    assert outcomes[0].startswith("error: ") and "train.de" in outcomes[0] and "399" in outcomes[0], outcomes
    assert outcomes[1] == "error: rank 0 could not prepare the data: " + outcomes[0].removeprefix("error: ")


def test_a_rank_resuming_an_older_checkpoint_stops_every_rank(runs, tmp_path):
    """A node whose run directory holds an older latest.pt would resume other weights at another step."""
    import shutil

    first, _, _ = runs  # its run directory now holds the resumed run: latest.pt at TOTAL, step STOP kept
    stale = shutil.copytree(first.run_dir, tmp_path / "node1-run")
    ckpts = stale / "checkpoints"
    (ckpts / "latest.pt").unlink()
    shutil.copy(ckpts / f"step_{STOP:08d}.pt", ckpts / "latest.pt")
    cfg = train_changes(tiny_config(Path(first.run_dir).parent / "toy", first.run_dir), max_steps=TOTAL + 2)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="true", log_every=1))
    outcomes = _spawn_two_ranks([cfg, dataclasses.replace(cfg, run_dir=str(stale))], tmp_path)
    assert outcomes[0] == outcomes[1], outcomes
    assert f"step {STOP} (rank 0: {TOTAL})" in outcomes[0] and "weights" in outcomes[0], outcomes[0]
    assert "data" not in outcomes[0].split("rank 1 on")[1].split(". Every node")[0], outcomes[0]


def test_a_run_moves_between_world_sizes_with_a_warning(runs, tmp_path):
    """A run trained on two processes goes on in one (a node lost), and back on two (more nodes): from
    its step, with its weights, and with a warning that the update size changed."""
    import shutil

    import torch

    first, _, _ = runs  # two processes, at TOTAL
    run_dir = shutil.copytree(first.run_dir, tmp_path / "moved")
    toy = Path(first.run_dir).parent / "toy"
    cfg = tiny_config(toy, run_dir, max_steps=TOTAL + 2, log_every=1, resume="true")
    one = subprocess.run(
        [sys.executable, "-m", "nmt.train", *cli_overrides(cfg)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    output = one.stdout + one.stderr
    assert one.returncode == 0, output[-3000:]
    assert "written by a run of 2 processes and this run has 1" in output
    assert "train.accum_steps=2 keeps the update size" in output
    assert f"step {TOTAL + 1}/{TOTAL + 2}" in output and f"step {TOTAL}/" not in output
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["world_size"] == 1

    two = torchrun(train_changes(cfg, max_steps=TOTAL + 4), tmp_path, "two")()
    assert "written by a run of 1 processes and this run has 2" in two.output
    ranks = two.ranks()
    assert [ranks[r][:2] for r in (0, 1)] == [(TOTAL + 2, TOTAL + 4)] * 2
    assert ranks[0][3] == ranks[1][3]  # the same weights on both
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    seeds = [int(rank["torch"][:8].view(torch.int64)) for rank in state["rng_per_rank"]]
    assert state["world_size"] == 2 and seeds[0] != seeds[1], seeds  # the new rank drew its own masks
