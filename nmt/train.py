"""``python -m nmt.train +experiment=base [key=value ...]``: compose the config, prepare data, train.

Also runs under ``torchrun --nproc_per_node=N -m nmt.train ...`` (DDP). Hydra stops here: below this
module everything takes the typed :class:`nmt.config.Config`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from nmt.config import Config, ConfigError, register_schema, to_config

log = logging.getLogger("nmt.train")

register_schema()


def run(cfg: Config) -> int:
    """Train one run described by ``cfg``. Returns the process exit code."""
    from torch.utils.tensorboard import SummaryWriter

    from nmt.data import prepare_data
    from nmt.distributed import barrier, init_distributed, shutdown_distributed
    from nmt.trainer import Trainer, find_resume_checkpoint, resolve_device

    device = resolve_device(cfg.train.device)
    dist = init_distributed(device.type)
    if not dist.is_main:  # one voice: other ranks only report problems
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = Path(cfg.run_dir)
    try:
        resume_from = find_resume_checkpoint(cfg, run_dir)
        log.info("run directory: %s", run_dir.resolve())
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        # Rank 0 trains the tokenizer and fills the encoding cache; the others then read the cache.
        if not dist.is_main:
            barrier(dist)
        data = prepare_data(cfg.data, run_dir=run_dir, resume_from=resume_from)
        if dist.is_main:
            barrier(dist)
        writer = SummaryWriter(str(run_dir / "tb")) if dist.is_main else None
        if writer is not None:
            writer.add_text("config", "```\n" + OmegaConf.to_yaml(OmegaConf.structured(cfg)) + "\n```", 0)
        trainer = Trainer(cfg, data, run_dir, dist=dist, writer=writer)
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
        result = trainer.train()
        if writer is not None:
            writer.close()
    finally:
        shutdown_distributed()
    if dist.is_main:
        metric = cfg.train.best_metric
        best = "n/a" if result.state.best_score is None else f"{result.state.best_score:.2f}"
        print(
            f"done: {result.stop_reason} | step {result.state.step} | best valid {metric} {best} "
            f"at step {result.state.best_step} | checkpoint {result.best_checkpoint or run_dir / 'checkpoints'}",
            flush=True,
        )
    return 0


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(dcfg: DictConfig) -> None:
    from nmt.checkpoint import CheckpointError
    from nmt.data import DataError
    from nmt.trainer import TrainingError

    try:
        cfg = to_config(dcfg)
        code = run(cfg)
    except (ConfigError, DataError, TrainingError, CheckpointError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
