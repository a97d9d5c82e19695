"""``python -m nmt.train +experiment=base [key=value ...]``: compose the config, prepare data, train.

Also runs under ``torchrun --nproc_per_node=N -m nmt.train ...`` (DDP). Hydra stops here: below this
module everything takes the typed :class:`nmt.config.Config`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from nmt.config import Config, ConfigError, check_override_keys, register_schema, to_config

if TYPE_CHECKING:
    from nmt.data.corpus import PreparedData
    from nmt.distributed import DistInfo
    from nmt.runtime import EventLog
    from nmt.trainer import Trainer

log = logging.getLogger("nmt.train")

register_schema()


def run(cfg: Config) -> int:
    """Train one run described by ``cfg``. Returns the process exit code: 0 when a stopping rule ended
    it, 128 + the signal's number (130 Ctrl-C, 143 SIGTERM) when a signal did, after saving."""
    from nmt.checkpoint import find_resume_checkpoint
    from nmt.device import resolve_device
    from nmt.distributed import barrier, init_distributed, shutdown_distributed
    from nmt.runtime import keep_freed_memory_in_heap
    from nmt.trainer import Trainer

    # Checked again by the Trainer, which can be built on its own; here they fail before the data is read.
    cfg.check_for_training()
    device = resolve_device(cfg.train.device, "train.device")
    if device.type == "cpu" and keep_freed_memory_in_heap():
        log.debug("glibc malloc: freed memory is kept in the heap for reuse")
    dist = init_distributed(device.type)
    if not dist.is_main:  # one voice: other ranks only report problems
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = Path(cfg.run_dir)
    lock = None
    try:
        lock = hold_run_dir(run_dir, dist)
        resume_from = find_resume_checkpoint(cfg, run_dir)
        log.info("run directory: %s", run_dir.resolve())
        data = prepare_data_main_first(cfg, dist, run_dir, resume_from)
        if dist.enabled:
            check_ranks_agree(data_facts(cfg, data), dist)
        trainer = Trainer(cfg, data, run_dir, dist=dist)
        log.info(
            "model: %s parameters | vocab src %d tgt %d | device %s | precision %s | world size %d",
            f"{trainer.raw_model.num_parameters():,}",
            data.tokenizer.src_vocab_size,
            data.tokenizer.tgt_vocab_size,
            trainer.device,
            str(trainer.dtype).replace("torch.", ""),
            dist.world_size,
        )
        if resume_from is not None:
            trainer.resume(resume_from)
        if dist.enabled:
            check_ranks_agree(
                {"step": trainer.state.step, "weights": f"{trainer.weight_checksum():.12g}"}, dist
            )
        # Only now: a resume that is refused leaves the run's config.yaml and TensorBoard log as they were.
        writer = start_run_files(cfg, run_dir, trainer.state.step) if dist.is_main else None
        trainer.log_to(writer)
        start_step = trainer.state.step
        result = trainer.train()
        if dist.enabled:
            report_ranks(trainer, start_step)
        if writer is not None:
            writer.close()
        # Every rank leaves the process group together, once rank 0 has closed its TensorBoard log.
        # Without this, a rank that finished first sometimes aborted at exit ("terminate called
        # without an active exception") and torchrun reported a finished run as failed (2 of 19 runs
        # of tests/test_distributed.py; none of 30 since). Not in `finally`: after an error, a barrier
        # could wait for a rank that never comes.
        barrier(dist)
    finally:
        shutdown_distributed()
        if lock is not None:
            lock.close()
    if dist.is_main:
        state, checkpoints = result.state, run_dir / "checkpoints"
        if state.best_score is None:  # stopped before its first validation
            best = f"not validated yet | checkpoint {checkpoints / 'latest.pt'}"
        else:
            best = (
                f"best valid {cfg.train.best_metric} {state.best_score:.2f} at step {state.best_step} | "
                f"checkpoint {result.best_checkpoint or checkpoints}"
            )
        print(f"done: {result.stop_reason} | step {state.step} | {best}", flush=True)
    # Saved, but not finished: a script or scheduler running this must not take it for done.
    return 0 if result.signal is None else 128 + int(result.signal)


def start_run_files(cfg: Config, run_dir: Path, step: int) -> EventLog:
    """Write the run's config.yaml and open its TensorBoard log, for a run that starts at ``step`` (0, or
    where it resumes); a run_dir that cannot take them (a full disk) stops the run now, before it trains
    steps it could not save."""
    from nmt.files import write_atomic
    from nmt.runtime import EventLog
    from nmt.trainer import TrainingError

    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    try:
        # purge_step: points a killed run logged after its last checkpoint (all of them, for a run killed
        # before its first checkpoint and started again) are dropped, not drawn twice.
        writer = EventLog(run_dir / "tb", purge_step=step + 1 if step else 0)
        write_atomic(run_dir / "config.yaml", config_yaml.encode())
    except OSError as e:
        raise TrainingError(
            f"cannot write the run's files in {run_dir} ({e.strerror or e}); nothing was trained: fix that and "
            "run the same command again."
        ) from None
    writer.add_text("config", "```\n" + config_yaml + "\n```", step)  # a resumed run's at its step
    return writer


def hold_run_dir(run_dir: Path, dist: DistInfo) -> IO[str] | None:
    """Rank 0 creates ``run_dir`` and holds it (:func:`nmt.checkpoint.lock_run_dir`) for the whole run,
    before looking for a checkpoint to resume: a second training into the same folder is refused. The
    other ranks learn whether it could, and stop with its reason if not."""
    from nmt.checkpoint import CheckpointError, lock_run_dir
    from nmt.distributed import raise_main_rank_failure

    lock, error = None, None
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = lock_run_dir(run_dir)
            check_checkpoints_writable(run_dir / "checkpoints")
        except OSError as e:
            error = CheckpointError(f"cannot create the run directory {run_dir} ({e.strerror or e}).")
        except CheckpointError as e:
            error = e
    raise_main_rank_failure(error, dist, CheckpointError)
    return lock


def check_checkpoints_writable(ckpt_dir: Path) -> None:
    """A run's existing checkpoints folder that cannot be written (read-only, another owner's) would
    fail only at the first save, valid_every steps later: find out now."""
    from nmt.checkpoint import CheckpointError
    from nmt.files import unwritable

    if not ckpt_dir.is_dir():
        return  # created at the first save, in a run_dir that RunDirCheck found writable
    reason = unwritable(ckpt_dir, create=False)
    if reason is not None:
        raise CheckpointError(
            f"cannot write checkpoints into {ckpt_dir} ({reason}); fix that, or train into another run_dir."
        )


def prepare_data_main_first(
    cfg: Config, dist: DistInfo, run_dir: Path, resume_from: Path | None
) -> PreparedData:
    """Prepare the data on rank 0 first (download, tokenizer, encoding cache), then on the others,
    which read what it wrote. Only rank 0 writes into the run directory (tokenizer copy, config,
    checkpoints, TensorBoard). If rank 0 fails (a missing or malformed file, no network), every rank
    stops with its reason."""
    from nmt.data.corpus import prepare_data
    from nmt.data.sources import DataError
    from nmt.distributed import main_rank_outcome

    if dist.is_main:
        try:
            data = prepare_data(cfg.data, run_dir=run_dir, resume_from=resume_from)
        except BaseException as e:
            main_rank_outcome(e, dist)
            raise
        main_rank_outcome(None, dist)
        return data
    failure = main_rank_outcome(None, dist)
    if failure is not None:
        raise DataError(f"rank 0 could not prepare the data: {failure}")
    return prepare_data(cfg.data, run_dir=None, resume_from=resume_from)


def data_facts(cfg: Config, data: PreparedData) -> dict[str, str]:
    """What every rank must share before it builds the model: data, tokenizer and settings."""
    settings = cfg.to_dict()
    for section, key in (("data", "dir"), ("data", "cache_dir"), ("train", "resume")):
        del settings[section][key]  # paths: they may differ from node to node
    del settings["run_dir"]
    return {
        "data": data.fingerprint,
        "tokenizer": data.tokenizer.fingerprint()[:16],
        "settings": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16],
    }


def check_ranks_agree(facts: dict[str, Any], dist: DistInfo) -> None:
    """Under DDP, stop every rank at once unless each holds what rank 0 holds.

    Each rank reads its own copy of the data, of the encoding cache and of the checkpoint it resumes
    from. A node whose copies differ (another version of the corpus, an older latest.pt in a run
    directory that is not shared) would otherwise fail in DDP's set-up with a shape error, train on
    other data or from other weights without a word (DDP averages gradients, it does not compare
    weights), or wait forever in collectives the other ranks never reach.
    """
    from nmt.distributed import disagreements
    from nmt.trainer import TrainingError

    problems = disagreements(facts, dist)
    if problems:
        raise TrainingError(
            "the ranks would not train the same model: " + "; ".join(problems) + ". Every node must read "
            "the same files: put data.dir (or data.cache_dir) and run_dir on a filesystem all nodes share, "
            "or give each node the same copies as rank 0's."
        )


def report_ranks(trainer: Trainer, start_step: int) -> None:
    """Log, on rank 0, each rank's own account of the run: steps, last loss, a checksum of its weights.

    Every rank contributes its own numbers (all_gather), so the log shows that the ranks took the same
    steps and hold the same weights, which is what DDP promises; other ranks log only warnings.
    """
    from nmt.distributed import all_gather_floats

    state = trainer.state
    last_loss = state.losses[-1] if state.losses else float("nan")
    checksum = trainer.weight_checksum()  # drift between ranks would show here
    rows = all_gather_floats([start_step, state.step, last_loss, checksum], trainer.dist, trainer.device)
    for rank, (first, last, loss, weights) in enumerate(rows):
        log.info(
            "rank %d: steps %d -> %d | last loss %.4f | weight checksum %r", rank, first, last, loss, weights
        )


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(dcfg: DictConfig) -> None:
    from nmt.checkpoint import CheckpointError
    from nmt.data.sources import DataError
    from nmt.trainer import TrainingError

    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        cfg = to_config(dcfg)
        if sweep:
            cfg = sweep_job(cfg)
        code = run(cfg)
    except (ConfigError, DataError, TrainingError, CheckpointError) as e:
        message = str(e)
        if under_torchrun():  # which process, on which machine
            message = f"rank {os.environ.get('RANK', '?')} on {socket.gethostname()}: {message}"
        elif sweep:  # which job; the later ones never ran (under torchrun, sweeps are refused)
            message = (
                f"job {HydraConfig.get().job.num} of the sweep: {message} (the sweep stops here; once the "
                "command is fixed, it continues the sweep with train.resume=true)"
            )
        log_to_files(logging.ERROR, message)  # the terminal gets it once, below
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C (the trainer logged where the last checkpoint is)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if code == 0 and sweep:
        return  # on to the sweep's next job
    if code == 0 and under_torchrun():
        exit_finished_worker()
    sys.exit(code)


def log_to_files(level: int, message: str) -> None:
    """Log ``message`` into the run's log file (Hydra's file handler) and not onto the console, which
    gets its own line on stderr."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def under_torchrun() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class RunDirCheck(Callback):
    """Hydra creates the run directory (its log goes there) before any of nmt's code runs; one that
    cannot be created or written would end in Hydra's traceback. Configured in configs/config.yaml."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        path = str(config.hydra.run.dir)
        if (Path(path) / "multirun.yaml").exists():
            _refuse(
                f"run_dir={path} holds a sweep (multirun.yaml); train a single run into another run_dir=PATH."
            )
        _check_run_dir(path)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from nmt.checkpoint import run_checkpoint

        path = str(config.hydra.sweep.dir)
        if (held := run_checkpoint(Path(path) / "checkpoints")) is not None:
            _refuse(
                f"run_dir={path} holds a single run (checkpoints/{held.name}); a sweep would put its jobs "
                "inside it. Give the sweep another run_dir=PATH (or name=NEW_NAME)."
            )
        _check_run_dir(path)


def _check_run_dir(path: str) -> None:
    from nmt.files import unwritable

    reason = unwritable(Path(path))
    if reason is not None:
        _refuse(f"run_dir={path} cannot be written ({reason}); choose another with run_dir=PATH.")


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def sweep_job(cfg: Config) -> Config:
    """One job of a sweep (``-m``): it trains in its own folder, run_dir/<job number>, with its log
    beside. With train.resume=true a job that never started (an earlier one stopped the sweep) starts
    now, so the same command continues the whole sweep."""
    if under_torchrun():  # one process group per process: jobs cannot share it
        raise ConfigError(
            "a sweep (-m) runs its jobs one after another in one process, and a torchrun process cannot "
            "set up its process group twice; start one torchrun per setting instead."
        )
    from nmt.checkpoint import run_checkpoint

    run_dir = HydraConfig.get().runtime.output_dir
    train = cfg.train
    if train.resume_latest and run_checkpoint(Path(run_dir) / "checkpoints") is None:
        log.info("job %s of the sweep has no checkpoint yet: it starts now", HydraConfig.get().job.num)
        train = dataclasses.replace(train, resume="")
    return dataclasses.replace(cfg, run_dir=run_dir, train=train)


def exit_finished_worker() -> None:
    """End a torchrun worker whose run is over without the interpreter's teardown.

    By then checkpoints and TensorBoard are closed and the process group is destroyed. Yet a worker
    has been seen to abort during teardown ("terminate called without an active exception", after
    ``done:`` was printed; once in the three DDP launches of one test run, none in 24 launches in a
    loop), and torchrun then reports the finished run as failed. None of nmt's code runs there.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    try:  # before Hydra, whose own refusal advises adding the key with +key=value
        check_override_keys(sys.argv[1:])
    except ConfigError as e:
        _refuse(str(e))
    main()
