"""Training: accumulation, exact resume, checkpoints, NaN handling, TensorBoard tags."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from nmt.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint
from nmt.config import Config
from nmt.data.corpus import prepare_data
from nmt.distributed import DistInfo
from nmt.optim import lr_multiplier
from nmt.runtime import EventLog
from nmt.trainer import Trainer, TrainingError
from tests.conftest import tiny_config


def make_trainer(cfg: Config, writer=None) -> Trainer:
    data = prepare_data(cfg.data, run_dir=Path(cfg.run_dir), resume_from=None)
    return Trainer(cfg, data, Path(cfg.run_dir), writer=writer)


def with_train(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def test_accumulating_two_half_batches_equals_one_full_batch(toy_dir, tmp_path):
    cfg = tiny_config(toy_dir, tmp_path / "run", clip_norm=0.0)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0))
    full, halves = make_trainer(cfg), make_trainer(cfg)
    halves.raw_model.load_state_dict(full.raw_model.state_dict())
    # Plain SGD makes the update the gradient itself; Adam's first step is ~lr*sign(grad) and would
    # blow float rounding noise in zero-gradient parameters (e.g. the key bias) up to a full step.
    for t in (full, halves):
        t.optimizer = torch.optim.SGD(t.raw_model.parameters(), lr=1.0)
        t.scheduler = torch.optim.lr_scheduler.LambdaLR(t.optimizer, lambda step: 1.0)
    batch = next(full._batch_stream())
    b = batch.src.shape[0]
    assert b >= 4, "the toy batch must be splittable"
    first, second = _split(batch, b // 2)
    full.train_step([batch])
    halves.train_step([first, second])
    for (name, p_full), p_half in zip(full.raw_model.named_parameters(), halves.raw_model.parameters()):
        torch.testing.assert_close(p_full, p_half, rtol=1e-5, atol=1e-6, msg=name)


def _split(batch, k):
    from nmt.data.batching import collate

    def part(rows):
        src = [[t for t in batch.src[i].tolist() if t != 0] for i in rows]
        tgt = [
            [t for t in batch.tgt_out[i].tolist() if t != 0][:-1] for i in rows
        ]  # drop EOS: collate adds it
        return collate(src, tgt, [batch.indices[i].item() for i in rows])

    n = batch.src.shape[0]
    return part(range(k)), part(range(k, n))


def test_training_batches_equal_per_row_collate_and_resume_mid_epoch(toy_dir, tmp_path):
    from nmt.data.batching import collate

    trainer = make_trainer(tiny_config(toy_dir, tmp_path / "run"))
    train = trainer.data.train
    stream = trainer._batch_stream()
    for _ in range(3):
        batch = next(stream)
        rows = batch.indices.tolist()
        # The vectorised loader gives what collate() over the dataset's rows gives.
        expected = collate([train[i]["src_ids"] for i in rows], [train[i]["tgt_ids"] for i in rows], rows)
        for name in ("src", "tgt_in", "tgt_out", "indices"):
            assert torch.equal(getattr(batch, name), getattr(expected, name)), name
        assert (batch.num_src_tokens, batch.num_tgt_tokens) == (
            expected.num_src_tokens,
            expected.num_tgt_tokens,
        )
    # The sampler state after three batches resumes at the fourth, in a fresh trainer.
    state = trainer.loader.state_dict()
    assert state["position"] == 3
    fourth = next(stream)
    other = make_trainer(tiny_config(toy_dir, tmp_path / "other"))
    other.loader.load_state_dict(state)
    assert torch.equal(next(other._batch_stream()).indices, fourth.indices)


def test_validation_loss_equals_a_per_batch_reference(toy_dir, tmp_path):
    from nmt.data.batching import collate
    from nmt.data.tokenizer import PAD_ID
    from nmt.loss import label_smoothed_nll

    cfg = tiny_config(toy_dir, tmp_path / "run")
    trainer = make_trainer(cfg)
    trainer.raw_model.eval()
    valid = trainer.data.valid
    loss_sum = nll_sum = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(valid), 7):  # other batches than the loader's: sums do not depend on them
            rows = list(range(start, min(start + 7, len(valid))))
            batch = collate([valid[i]["src_ids"] for i in rows], [valid[i]["tgt_ids"] for i in rows], rows)
            logits = trainer.raw_model(batch.src, batch.tgt_in)
            loss, nll = label_smoothed_nll(logits, batch.tgt_out, cfg.train.label_smoothing, PAD_ID)
            loss_sum, nll_sum, tokens = (
                loss_sum + loss.item(),
                nll_sum + nll.item(),
                tokens + batch.num_tgt_tokens,
            )
    expected = (loss_sum / tokens, nll_sum / tokens)
    first = trainer.validator.loss()
    assert first == pytest.approx(expected, rel=1e-5)
    assert trainer.validator.loss() == first  # the cached loader gives the same batches again


def test_freed_memory_is_reused_without_page_faults():
    import resource

    from nmt.runtime import keep_freed_memory_in_heap

    if not keep_freed_memory_in_heap():
        pytest.skip("not glibc")

    def faults_of_a_step_like_round() -> int:
        """Minor page faults while three 64 MiB tensors are made, written and freed, as in a step."""
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        logits = torch.ones(16 * 2**20)
        lprobs = torch.exp(logits)
        grad = lprobs * 2
        del logits, lprobs, grad
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    fresh_pages = 3 * 64 * 2**20 // resource.getpagesize()  # what each round faults with glibc's defaults
    [faults_of_a_step_like_round() for _ in range(4)]  # the heap grows to fit
    later = sum(faults_of_a_step_like_round() for _ in range(4))
    assert later < fresh_pages, f"{later} page faults in four rounds; fresh pages would be {4 * fresh_pages}"


def test_split_batches_cover_the_same_tokens(toy_dir, tmp_path):
    trainer = make_trainer(tiny_config(toy_dir, tmp_path / "run"))
    batch = next(trainer._batch_stream())
    first, second = _split(batch, 2)
    assert first.num_tgt_tokens + second.num_tgt_tokens == batch.num_tgt_tokens
    assert torch.equal(torch.cat([first.indices, second.indices]), batch.indices)


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_boundary"])
def test_resume_gives_the_same_losses_bit_for_bit(toy_dir, tmp_path, where):
    base = tiny_config(toy_dir, tmp_path / "full", max_steps=1)
    steps_per_epoch = len(make_trainer(base).sampler)
    stop_at = steps_per_epoch // 2 if where == "mid_epoch" else steps_per_epoch
    total = stop_at + 4
    assert 0 < stop_at < total

    full = make_trainer(with_train(base, max_steps=total)).train()
    assert len(full.state.losses) == total

    cut = tiny_config(toy_dir, tmp_path / "cut", max_steps=stop_at)
    first = make_trainer(cut).train()
    assert first.state.step == stop_at
    resumed_cfg = with_train(cut, max_steps=total, resume="true")
    trainer = make_trainer(resumed_cfg)
    trainer.resume(find_resume_checkpoint(resumed_cfg, Path(cut.run_dir)))
    second = trainer.train()

    assert second.state.losses[:stop_at] == first.state.losses
    assert second.state.losses == full.state.losses  # exact equality, not allclose
    assert second.state.epoch == full.state.epoch


def test_fresh_run_refuses_to_overwrite_an_existing_run(toy_dir, tmp_path):
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=2)
    make_trainer(cfg).train()
    with pytest.raises(CheckpointError, match="train.resume=true"):
        find_resume_checkpoint(cfg, Path(cfg.run_dir))
    with pytest.raises(CheckpointError, match="does not exist"):
        find_resume_checkpoint(with_train(cfg, resume="true"), tmp_path / "elsewhere")


def test_device_and_precision_the_machine_lacks_are_training_errors(toy_dir, tmp_path, monkeypatch):
    """Caught by ``python -m nmt.train``, which prints the message instead of a traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=1)
    with pytest.raises(TrainingError, match="train.device=cuda but CUDA is not available"):
        make_trainer(with_train(cfg, device="cuda"))
    with pytest.raises(TrainingError, match="train.precision=fp16 needs a CUDA device"):
        make_trainer(with_train(cfg, device="cpu", precision="fp16"))


def test_checkpoints_are_self_contained_and_load_with_weights_only(toy_dir, tmp_path):
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=6, valid_every=2, keep_last=2)
    result = make_trainer(cfg).train()
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("step_*.pt")) == ["step_00000004.pt", "step_00000006.pt"]
    assert (ckpt_dir / "best.pt").exists() and result.best_checkpoint == ckpt_dir / "best.pt"
    raw = torch.load(ckpt_dir / "latest.pt", weights_only=True)
    for key in ("format_version", "config", "tokenizer", "model", "optimizer", "scheduler", "rng", "sampler"):
        assert key in raw
    assert raw["train_state"]["step"] == 6
    assert Config.from_dict(raw["config"]) == cfg
    assert not list(ckpt_dir.glob("*.tmp")), "no temp files are left behind"


def test_a_first_save_cut_short_after_its_step_file_names_that_file(toy_dir, tmp_path, monkeypatch):
    """The step file is linked before latest.pt is written; if that rename fails, the step file is
    the run's checkpoint (train.resume=true takes it), not "nothing was written"."""
    import os

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "latest.pt":
            raise OSError(5, "Input/output error")
        return real_replace(src, dst, *args, **kwargs)

    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=6, valid_every=2)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(TrainingError) as failed:
        make_trainer(cfg).train()
    monkeypatch.undo()
    step_file = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    assert str(failed.value).endswith(
        f"{step_file} holds step 2; fix that and continue from there with train.resume=true."
    )
    assert find_resume_checkpoint(with_train(cfg, resume="true"), Path(cfg.run_dir)) == step_file


def test_a_checkpoint_that_cannot_be_written_stops_the_run_naming_what_is_kept(
    toy_dir, tmp_path, monkeypatch
):
    """A full disk at the second save: the run stops with one sentence saying which step latest.pt still
    holds, and resuming from it continues as a run that never stopped would."""
    import nmt.trainer

    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=6, valid_every=2)
    real_save, saves = nmt.trainer.save_run_checkpoint, []

    def save(state, ckpt_dir, step, *args):
        saves.append(step)
        if len(saves) == 2:
            full = CheckpointError(f"could not write {ckpt_dir}/latest.pt: ... (No space left on device)")
            full.no_space = True  # as nmt.checkpoint marks a full disk
            raise full
        return real_save(state, ckpt_dir, step, *args)

    monkeypatch.setattr(nmt.trainer, "save_run_checkpoint", save)
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    with pytest.raises(TrainingError) as failed:
        make_trainer(cfg).train()
    assert str(failed.value) == (
        f"step 4 was not saved: could not write {latest.parent}/latest.pt: ... (No space left on device). "
        f"{latest} holds step 2; make room and continue from there with train.resume=true."
    )
    assert load_checkpoint(latest)["train_state"]["step"] == 2
    monkeypatch.undo()

    resumed = make_trainer(with_train(cfg, resume="true"))
    resumed.resume(latest)
    assert resumed.train().state.step == 6
    straight = make_trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "straight"))).train()
    assert resumed.state.losses == straight.state.losses


def test_the_first_checkpoint_failing_says_nothing_was_saved(toy_dir, tmp_path, monkeypatch):
    import nmt.trainer

    def save(*args):
        raise CheckpointError("could not write latest.pt: ... (No space left on device)")

    monkeypatch.setattr(nmt.trainer, "save_run_checkpoint", save)
    with pytest.raises(
        TrainingError, match=r"^step 2 was not saved: .*\. No checkpoint of this run was written; "
    ):
        make_trainer(tiny_config(toy_dir, tmp_path / "run", max_steps=6, valid_every=2)).train()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "foreach-adamw"])
def test_nan_loss_skips_the_step_then_aborts(fused, toy_dir, tmp_path, monkeypatch, caplog):
    cfg = tiny_config(toy_dir, tmp_path / "run", max_bad_steps=3)
    trainer = make_trainer(cfg)
    assert trainer.optimizer.defaults["fused"], "the CPU takes the fused kernel, which skips on the device"
    if not fused:  # a device without a fused kernel: the host reads the flag before the update
        params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        trainer.optimizer = torch.optim.AdamW(params, foreach=True)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    decoder = trainer.raw_model.decoder
    real_forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: real_forward(*a, **k) * float("nan"))
    stream = trainer._batch_stream()
    assert trainer.train_step([next(stream)]) is None
    assert trainer.train_step([next(stream)]) is None
    assert "step skipped" in caplog.text
    for k, v in trainer.raw_model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a skipped step"
    with pytest.raises(TrainingError, match="3 steps in a row.*; no checkpoint of this run was written"):
        trainer.train_step([next(stream)])


def _record_calls(trainer: Trainer, names: list[str]) -> list[str]:
    calls: list[str] = []
    for name in names:
        real = getattr(trainer, name)

        def wrapped(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        setattr(trainer, name, wrapped)
    return calls


def test_train_reads_a_step_only_after_queueing_the_next_steps_passes(toy_dir, tmp_path):
    """The host reads step N's loss once step N+1's forward and backward are queued, so a GPU is never
    left idle while the host waits for it; a step that is logged, validated or last is read at once."""
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=6, log_every=4, valid_every=6)
    trainer = make_trainer(cfg)
    calls = _record_calls(trainer, ["_backward", "_update", "_read", "_validate_and_save"])
    assert trainer.train().state.step == 6
    b, u, r, v = "_backward", "_update", "_read", "_validate_and_save"
    assert calls == [
        *[b, u],  # step 1: read during step 2
        *[b, r, u],  # step 2
        *[b, r, u],  # step 3: step 4 is logged, so read at once
        *[b, r, u, r],  # step 4
        *[b, u],  # step 5
        *[b, r, u, r, v],  # step 6: the last, validated
    ]


def test_train_gives_the_same_steps_as_reading_every_step_at_once(toy_dir, tmp_path, monkeypatch):
    """Reading a step late changes nothing: the same updates, losses and skipped step as train_step()
    one step at a time, a NaN step included (skipped on the device, its Adam step count undone)."""
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=6, log_every=100, valid_every=100)

    def make(run: str) -> Trainer:
        trainer = make_trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / run)))
        decoder, calls = trainer.raw_model.decoder, [0]
        real_forward = decoder.forward

        def forward(*args, **kwargs):
            calls[0] += 1
            out = real_forward(*args, **kwargs)
            return out * float("nan") if calls[0] == 3 and decoder.training else out

        monkeypatch.setattr(decoder, "forward", forward)
        return trainer

    late = make("late")
    result = late.train()
    at_once = make("at-once")
    stream, losses = at_once._batch_stream(), []
    while len(losses) < 6:
        stats = at_once.train_step([next(stream)])
        if stats is not None:
            losses.append(stats["loss"])
    assert result.state.step == 6 and result.state.losses == losses  # exact: the same arithmetic
    assert late.sampler.state_dict() == at_once.sampler.state_dict()  # 7 batches each, one skipped
    assert late.weight_checksum() == at_once.weight_checksum()
    assert late.scheduler.last_epoch == at_once.scheduler.last_epoch == 6
    adam_steps = {float(s["step"]) for s in late.optimizer.state.values()}
    assert adam_steps == {6.0}, "the skipped update advanced Adam's step count"


def test_gradient_scaler_overflow_skips_the_update_but_counts_the_step(toy_dir, tmp_path, caplog):
    """fp16's gradient scaler (here on the CPU): an overflow in the scaled gradients is expected early
    on. The update is skipped and the scale backs off, but the step counts and nothing is logged as
    bad, as with GradScaler.step; the next step, without overflow, updates the weights."""
    trainer = make_trainer(tiny_config(toy_dir, tmp_path / "run", max_bad_steps=1))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    overflows = [2]  # the next two backward passes overflow in one weight's gradient

    def overflow(grad):
        if overflows[0] > 0:
            overflows[0] -= 1
            return grad * float("inf")
        return grad

    next(trainer.raw_model.parameters()).register_hook(overflow)
    before = trainer.weight_checksum()
    stream = trainer._batch_stream()
    for scale in (512.0, 256.0):
        stats = trainer.train_step([next(stream)])
        assert stats is not None and math.isfinite(stats["loss"]) and not math.isfinite(stats["grad_norm"])
        assert trainer.weight_checksum() == before and trainer.scaler.get_scale() == scale
    assert trainer.scheduler.last_epoch == 2 and "skipped" not in caplog.text
    stats = trainer.train_step([next(stream)])
    assert stats is not None and math.isfinite(stats["grad_norm"]) and trainer.weight_checksum() != before
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {1.0}  # one update applied


def test_a_checkpoint_of_a_foreach_optimizer_resumes_with_the_fused_one(toy_dir, tmp_path):
    """Checkpoints written on a CPU before AdamW was fused there hold foreach=True in their parameter
    groups, which loading would bring back (and the fused skip flag would then fail). The run takes its
    own implementation and continues as a run that never stopped."""
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=2, valid_every=2)
    make_trainer(cfg).train()
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    state = torch.load(latest, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=None, foreach=True)  # as build_optimizer wrote them on a CPU
    torch.save(state, latest)
    resumed = make_trainer(with_train(cfg, max_steps=4, resume="true"))
    resumed.resume(latest)
    assert resumed.train().state.step == 4
    assert all(group["fused"] for group in resumed.optimizer.param_groups)
    straight = make_trainer(
        dataclasses.replace(with_train(cfg, max_steps=4), run_dir=str(tmp_path / "straight"))
    )
    assert resumed.state.losses == straight.train().state.losses


def test_tensorboard_has_the_documented_tags(toy_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=4, log_every=2, valid_every=4)
    writer = EventLog(tmp_path / "tb")
    make_trainer(cfg, writer=writer).train()
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/ppl",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec",
        "valid/loss",
        "valid/ppl",
        "valid/bleu",
        "valid/chrf",
    }
    assert expected <= scalars
    assert "valid/samples/text_summary" in events.Tags()["tensors"]
    losses = [e.value for e in events.Scalars("train/loss")]
    assert all(math.isfinite(v) for v in losses) and len(losses) == 2


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # the writer thread's
def test_tensorboard_write_failures_cost_the_curves_not_the_run(toy_dir, tmp_path, caplog):
    """A full disk or a removed run_dir fails TensorBoard's writes: warned once, training goes on."""
    import shutil

    writer = EventLog(tmp_path / "tb")
    writer.add_scalar("x", 1.0, 1)
    writer.flush()
    shutil.rmtree(tmp_path / "tb")  # the next write of TensorBoard's thread fails
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=6, log_every=1, valid_every=3)
    with caplog.at_level("WARNING", logger="nmt.runtime"):
        result = make_trainer(cfg, writer=writer).train()
        writer.close()
    assert result.state.step == 6 and result.stop_reason == "reached train.max_steps=6"
    assert load_checkpoint(Path(cfg.run_dir) / "checkpoints" / "latest.pt")["train_state"]["step"] == 6
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1 and "can no longer be written" in warnings[0]


def test_progress_reports_the_first_step_at_once_and_the_bar_moves_every_step(monkeypatch, caplog):
    import io

    from nmt.runtime import Progress

    with caplog.at_level("INFO", logger="nmt.runtime"):  # a log file: lines at the log steps
        progress = Progress(total=300, initial=100, enabled=True, log_every=50)
        for step in range(101, 151):
            progress.advance(step)
        progress.update(150, {"loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 10.0})
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("step 101 done in 0:00:0")
    assert lines[0].endswith("a line every 50 steps (train.log_every)") and lines[1].startswith(
        "step 150/300"
    )

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    import logging

    monkeypatch.setattr("sys.stdout", Terminal())
    handlers = list(logging.getLogger().handlers)
    progress = Progress(total=300, initial=0, enabled=True, log_every=50)
    for step in (1, 2, 3):
        progress.advance(step)
        assert progress.bar.n == step  # not only at the log steps
    progress.close()
    progress.close()  # again (the trainer closes it once more on its way out): nothing
    assert logging.getLogger().handlers == handlers  # log lines no longer go through the bar


@pytest.mark.parametrize("schedule", ["inverse_sqrt", "cosine"])
def test_learning_rate_schedules(schedule, toy_dir, tmp_path):
    cfg = tiny_config(toy_dir, tmp_path, schedule=schedule, warmup_steps=10, max_steps=100, min_lr=1e-5).train
    factors = [lr_multiplier(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert max(factors) == pytest.approx(1.0) and factors.index(max(factors)) == 9
    assert all(a > b for a, b in zip(factors[9:], factors[10:])), "decays after warmup"
    if schedule == "cosine":
        assert factors[-1] * cfg.lr == pytest.approx(cfg.min_lr, rel=1e-2)
    else:
        assert factors[39] == pytest.approx(math.sqrt(10 / 40))


def test_scheduler_steps_once_per_optimizer_step(toy_dir, tmp_path):
    cfg = tiny_config(toy_dir, tmp_path / "run", accum_steps=3, max_steps=4)
    trainer = make_trainer(cfg)
    trainer.train()
    assert trainer.scheduler.last_epoch == 4
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        cfg.train.lr * lr_multiplier(4, cfg.train)
    )


def test_checkpoint_round_trip_restores_the_model(toy_dir, tmp_path):
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=2)
    trainer = make_trainer(cfg)
    trainer.train()
    state = load_checkpoint(Path(cfg.run_dir) / "checkpoints" / "latest.pt")
    for k, v in trainer.raw_model.state_dict().items():
        assert torch.equal(state["model"][k], v)


def test_compiled_training_validates_and_saves_plain_checkpoints(toy_dir, tmp_path, traced_graphs):
    """train.compile=true: training steps run the compiled layers (and, on CPU in fp32, the slice-wise
    loss, which stays eager), validation and its beam search run the plain model without compiling
    anything, and checkpoints hold the plain model's state_dict (no ``_orig_mod.`` prefix). aot_eager
    traces the forward and backward graphs as inductor would, without generating code."""
    cfg = with_train(tiny_config(toy_dir, tmp_path / "run", max_steps=6, valid_every=3), compile=True)
    trainer = make_trainer(cfg)
    assert trainer.model is not trainer.loss_model and trainer.projected_loss
    result = trainer.train()
    assert result.state.step == 6 and all(math.isfinite(loss) for loss in result.state.losses)
    assert traced_graphs, "training steps ran the compiled layers"
    traced = len(traced_graphs)
    metrics = trainer.validate()
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["bleu"])
    assert len(traced_graphs) == traced, "validation compiled a graph"
    saved = load_checkpoint(Path(cfg.run_dir) / "checkpoints" / "latest.pt")
    assert list(saved["model"]) == list(trainer.raw_model.state_dict())
    assert not [k for k in saved["model"] if "_orig_mod" in k]


def test_compiled_training_from_logits_compiles_the_loss(toy_dir, tmp_path, traced_graphs):
    """Where the loss is computed from logits (here bf16 on CPU; every GPU run), train.compile=true
    compiles it too: one graph for the loss beside one per layer class, over every batch shape, and
    validation still compiles nothing."""
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=4, valid_every=2)
    trainer = make_trainer(with_train(cfg, compile=True, precision="bf16"))
    assert not trainer.projected_loss
    result = trainer.train()
    assert result.state.step == 4 and all(math.isfinite(loss) for loss in result.state.losses)
    assert len(traced_graphs) == 3  # encoder layer, decoder layer, loss


def test_resume_reads_the_checkpoint_onto_the_cpu_whatever_the_training_device(toy_dir, tmp_path):
    # On a GPU, RNG states mapped onto it broke resume: numpy and torch.set_rng_state take CPU tensors
    # only. The model and optimizer copy their tensors to their parameters' device anyway, so the
    # checkpoint is read onto the CPU. meta stands in for the GPU: nothing mapped there can be read.
    cut = tiny_config(toy_dir, tmp_path / "cut", max_steps=2)
    make_trainer(cut).train()
    resumed_cfg = with_train(cut, max_steps=4, resume="true")
    trainer = make_trainer(resumed_cfg)
    trainer.device = torch.device("meta")
    trainer.resume(find_resume_checkpoint(resumed_cfg, Path(cut.run_dir)))
    assert trainer.state.step == 2
    assert all(p.device.type == "cpu" for p in trainer.raw_model.parameters())


def test_a_changed_optimizer_setting_applies_after_resume(toy_dir, tmp_path, caplog):
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=4)
    make_trainer(cfg).train()
    changed = with_train(
        cfg, max_steps=6, resume="true", lr=1e-4, betas=[0.5, 0.6], weight_decay=0.1, label_smoothing=0.2
    )
    trainer = make_trainer(changed)
    with caplog.at_level("WARNING", logger="nmt.trainer"):
        trainer.resume(find_resume_checkpoint(changed, Path(cfg.run_dir)))
    assert "train.lr changed from 0.003 to 0.0001 since the checkpoint: the run goes on" in caplog.text
    assert "train.label_smoothing changed from 0.1 to 0.2" in caplog.text
    assert (
        "train.max_steps changed" not in caplog.text
    )  # the inverse square root schedule does not depend on it
    decay, no_decay = trainer.optimizer.param_groups
    expected_lr = 1e-4 * lr_multiplier(4, changed.train)
    for group in (decay, no_decay):
        assert group["lr"] == expected_lr and group["betas"] == (0.5, 0.6)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    trainer.train()
    # The schedule goes on from the new base rate: step 5's update used 1e-4 * multiplier(5).
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-4 * lr_multiplier(6, changed.train)


def test_a_resume_after_moving_a_damaged_best_checkpoint_away_links_best_again(
    toy_dir, tmp_path, monkeypatch
):
    """best.pt was the damaged file's third name; the step file resumed from is the best so far."""
    import os

    scores = iter([1.0, 2.0])
    monkeypatch.setattr(
        Trainer, "validate", lambda self: {"loss": 1.0, "ppl": 2.7, "bleu": next(scores), "chrf": 1.0}
    )
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=4, valid_every=2, keep_last=5)
    make_trainer(cfg).train()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert os.path.samefile(ckpt_dir / "best.pt", ckpt_dir / "step_00000004.pt")
    for name in ("latest.pt", "step_00000004.pt", "best.pt"):  # as the advice for a damaged file says
        (ckpt_dir / name).unlink()
    resumed_cfg = with_train(cfg, resume="true")
    trainer = make_trainer(resumed_cfg)
    trainer.resume(find_resume_checkpoint(resumed_cfg, Path(cfg.run_dir)))
    assert trainer.state.step == trainer.state.best_step == 2
    assert os.path.samefile(ckpt_dir / "best.pt", ckpt_dir / "step_00000002.pt")


def test_a_run_resumed_in_fp16_starts_its_loss_scale_anew(toy_dir, tmp_path):
    """A bf16 or fp32 checkpoint holds an empty GradScaler state, which an enabled scaler refuses to
    load. (fp16 needs a GPU; here the trainer's scaler is switched on by hand.)"""
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=2)
    make_trainer(cfg).train()
    resumed_cfg = with_train(cfg, max_steps=4, resume="true")
    trainer = make_trainer(resumed_cfg)
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)
    trainer.resume(find_resume_checkpoint(resumed_cfg, Path(cfg.run_dir)))
    assert trainer.state.step == 2 and trainer.scaler.get_scale() == 2.0**16


def test_resuming_into_another_model_is_one_sentence_naming_the_settings(toy_dir, tmp_path):
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=2)
    make_trainer(cfg).train()
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=64, ffn_dim=128))
    other = with_train(other, resume="true")
    with pytest.raises(TrainingError) as error:
        make_trainer(other).resume(find_resume_checkpoint(other, Path(cfg.run_dir)))
    message = str(error.value)
    assert "model.d_model=32, model.ffn_dim=" in message and "model.d_model=64, model.ffn_dim=128" in message
    assert len(message) < 400 and "\n" not in message
    # The run keeps its checkpoint's tokenizer: a new vocabulary size would be recorded, never used.
    other = with_train(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, vocab_size=200)), resume="true"
    )
    with pytest.raises(
        TrainingError, match=r"data\.vocab_size=\d+ and this run asks for data\.vocab_size=200"
    ):
        make_trainer(other).resume(find_resume_checkpoint(other, Path(cfg.run_dir)))
    # The best BLEU so far must stay comparable: the tokenizer BLEU used may not change (auto was 13a).
    other = with_train(cfg, resume="true", bleu_tokenize="char")
    asks = r"train\.bleu_tokenize='13a' and this run asks for train\.bleu_tokenize='char'"
    with pytest.raises(TrainingError, match=asks):
        make_trainer(other).resume(find_resume_checkpoint(other, Path(cfg.run_dir)))
    same = with_train(cfg, resume="true", bleu_tokenize="13a")
    make_trainer(same).resume(find_resume_checkpoint(same, Path(cfg.run_dir)))


def test_max_epochs_stops_when_the_epoch_ends(toy_dir, tmp_path):
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=1000, max_epochs=1)
    trainer = make_trainer(cfg)
    result = trainer.train()
    assert result.stop_reason == "reached train.max_epochs=1"
    assert result.state.step == len(trainer.loader)  # not one batch into the second epoch


def test_patience_counts_only_scheduled_validations_so_a_resumed_run_stops_where_one_would(
    toy_dir, tmp_path, monkeypatch
):
    """A run cut at step 15 validates there (off the valid_every=10 grid); continued, it must stop
    at step 30 like the uninterrupted run (best at 10, no improvement at 20 and 30, patience 2)."""
    monkeypatch.setattr(
        Trainer, "validate", lambda self: {"loss": 1.0, "ppl": 2.7, "bleu": 5.0, "chrf": 20.0}
    )
    settings = dict(valid_every=10, patience=2, keep_last=0)
    full = make_trainer(tiny_config(toy_dir, tmp_path / "full", max_steps=40, **settings)).train()
    assert full.state.step == 30 and full.stop_reason.startswith("no improvement in 2 validations")

    cut = tiny_config(toy_dir, tmp_path / "cut", max_steps=15, **settings)
    assert make_trainer(cut).train().state.step == 15
    resumed_cfg = with_train(cut, max_steps=40, resume="true")
    trainer = make_trainer(resumed_cfg)
    trainer.resume(find_resume_checkpoint(resumed_cfg, Path(cut.run_dir)))
    resumed = trainer.train()
    assert (resumed.state.step, resumed.stop_reason) == (full.state.step, full.stop_reason)
    assert resumed.state.best_step == full.state.best_step == 10


def test_a_run_that_early_stopping_ended_stays_ended_when_resumed(toy_dir, tmp_path, monkeypatch):
    """Resumed with the same patience (a sweep continued with train.resume=true), it stops at once
    instead of training on; a larger patience lets it go on."""
    validations = []

    def validate(self):
        validations.append(self.state.step)
        return {"loss": 1.0, "ppl": 2.7, "bleu": 5.0, "chrf": 20.0}

    monkeypatch.setattr(Trainer, "validate", validate)
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=100, valid_every=10, patience=1)
    assert make_trainer(cfg).train().state.step == 20  # best at 10, no improvement at 20
    latest = Path(cfg.run_dir) / "checkpoints" / "latest.pt"
    saved = latest.stat().st_mtime_ns
    validations.clear()
    for patience, steps in ((1, 20), (2, 30)):
        resumed_cfg = with_train(cfg, resume="true", patience=patience)
        trainer = make_trainer(resumed_cfg)
        trainer.resume(find_resume_checkpoint(resumed_cfg, Path(cfg.run_dir)))
        result = trainer.train()
        assert result.stop_reason == f"no improvement in {patience} validations (train.patience)"
        assert result.state.step == steps
        if patience == 1:
            assert validations == [] and latest.stat().st_mtime_ns == saved  # nothing trained or rewritten


def test_a_failing_validation_saves_the_training_state_first(toy_dir, tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(Trainer, "validate", broken)
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=20, valid_every=6)
    with pytest.raises(RuntimeError, match="validation broke"):
        make_trainer(cfg).train()
    state = load_checkpoint(Path(cfg.run_dir) / "checkpoints" / "latest.pt")
    assert state["train_state"]["step"] == 6  # the six steps are not lost


def test_validation_loss_leaves_out_pairs_the_model_cannot_read(toy_dir, tmp_path, caplog, monkeypatch):
    """Validation data is not length-filtered; a pair past model.max_positions would crash the loss."""
    cfg = tiny_config(toy_dir, tmp_path / "run")
    trainer = make_trainer(cfg)
    lengths = [len(ids) for ids in trainer.data.valid["src_ids"]]
    limit = sorted(lengths)[len(lengths) // 2]  # half the pairs are too long for this limit
    short = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, max_positions=limit),
        data=dataclasses.replace(cfg.data, max_len=limit - 1),
    )
    trainer = make_trainer(short)
    with caplog.at_level("WARNING", logger="nmt.validation"):
        loss, nll = trainer.validator.loss()
    assert math.isfinite(loss) and math.isfinite(nll)
    assert "validation loss leaves out" in caplog.text
    assert set(trainer.validate()) == {"loss", "ppl", "bleu", "chrf"}  # BLEU covers every pair

    # Under DDP only rank 0 says so, not every rank. (DDP's wrapper needs a process group; not here.)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, device_ids: model)
    caplog.clear()
    rank1 = Trainer(short, trainer.data, Path(short.run_dir), dist=DistInfo(rank=1, world_size=2))
    assert len(rank1.validator._fitting) == len(trainer.validator._fitting) < len(trainer.data.valid)
    assert "leaves out" not in caplog.text


def test_validation_bleu_uses_the_configured_tokenizer(toy_dir, tmp_path, caplog):
    trainer = make_trainer(tiny_config(toy_dir, tmp_path / "run", bleu_tokenize="char"))
    with caplog.at_level("INFO", logger="nmt.validation"):
        trainer.validate()
    assert "tok:char" in caplog.text and "tok:13a" not in caplog.text


def test_validation_decodes_in_the_precision_translate_would_use(toy_dir, tmp_path, monkeypatch):
    """On a GPU ``nmt.translate`` decodes a checkpoint in bf16 (``--dtype auto``); validation BLEU must
    be what that gives, not what the fp32 training weights give. Here "auto" is made to mean bf16."""
    from nmt import validation
    from nmt.evaluate import score
    from nmt.translator import Translator

    monkeypatch.setattr(validation, "resolve_dtype", lambda precision, device: torch.bfloat16)
    scored: list[list[str]] = []
    monkeypatch.setattr(
        validation, "score", lambda hyps, refs, **kw: scored.append(hyps) or score(hyps, refs, **kw)
    )
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=30, valid_every=30)
    trainer = make_trainer(cfg)
    trainer.train()
    scored.clear()
    metrics = trainer.validate()
    assert next(trainer.raw_model.parameters()).dtype == torch.float32  # a copy was cast, not the model
    latest = Path(cfg.run_dir) / "checkpoints" / "latest.pt"
    hyps = Translator.from_checkpoint(latest, "cpu", "bf16").translate(trainer.data.valid_src)
    assert scored == [hyps] and metrics["bleu"] == score(hyps, trainer.data.valid_ref).bleu
    fp32 = Translator.from_checkpoint(latest, "cpu", "fp32").translate(trainer.data.valid_src)
    assert fp32 != hyps, "bf16 and fp32 decoding must differ for this test to mean anything"


def test_tensorboard_after_a_killed_run_resumes_draws_each_step_once(toy_dir, tmp_path):
    """A run killed after its last checkpoint logged steps it will train again; the curves must not
    double back when the resumed run logs them anew."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nmt.train import run

    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=8, log_every=1, valid_every=4, keep_last=3)
    assert run(cfg) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "latest.pt").unlink()  # as if killed at step 8 before it saved: latest is step 4
    shutil.copy(ckpts / "step_00000004.pt", ckpts / "latest.pt")
    (ckpts / "step_00000008.pt").unlink()
    resumed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=10, resume="true"))
    assert run(resumed) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))


def test_a_run_dir_that_cannot_take_the_run_files_stops_the_run_before_training(toy_dir, tmp_path):
    from nmt.train import run

    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=2, valid_every=2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tb").write_text("not a folder")  # as a full disk, the event file cannot be made
    with pytest.raises(
        TrainingError, match=r"^cannot write the run's files in .*run \(File exists\); nothing"
    ):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tensorboard_shows_only_the_steps_of_the_run_that_goes_on(toy_dir, tmp_path):
    """A run killed before its first checkpoint leaves events; started again, its curves are the new
    run's alone. A resumed run drops what the killed run logged after its checkpoint."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nmt.train import run

    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=4, log_every=1, valid_every=4)
    killed = EventLog(tmp_path / "run" / "tb")
    for step in (1, 2, 3):
        killed.add_scalar("train/loss", 99.0, step)
    killed.close()
    time.sleep(1.1)  # event files are named by the second they were created in
    assert run(cfg) == 0
    killed = EventLog(tmp_path / "run" / "tb")  # the run went on to step 6 and was killed there
    for step in (5, 6):
        killed.add_scalar("train/loss", 99.0, step)
    killed.close()
    time.sleep(1.1)
    assert run(with_train(cfg, max_steps=6, resume="true")) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and 99.0 not in losses.values()
    assert [e.step for e in events.Tensors("config/text_summary")] == [0, 4]  # each start's, at its step


def test_a_read_only_checkpoints_folder_stops_a_resume_before_training(toy_dir, tmp_path, monkeypatch):
    import errno
    import tempfile

    from nmt.train import run

    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=2, valid_every=2)
    assert run(cfg) == 0
    ckpt_dir = tmp_path / "run" / "checkpoints"
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):  # as a read-only mount, which root's chmod cannot make
        if dir is not None and Path(dir) == ckpt_dir:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(CheckpointError, match=r"^cannot write checkpoints into .* \(Read-only file system\)"):
        run(with_train(cfg, max_steps=4, resume="true"))
    assert load_checkpoint(ckpt_dir / "latest.pt")["train_state"]["step"] == 2


def test_a_second_training_into_a_run_dir_in_use_is_refused(toy_dir, tmp_path):
    """Two trainings into one run_dir (a command started twice, a retry while the first still runs)
    would write over each other's checkpoints: while one holds the folder, the other is refused before
    it touches anything; once it ends, the folder is free again."""
    import os
    import socket

    from nmt.checkpoint import lock_run_dir
    from nmt.train import run

    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=2, valid_every=2)
    (tmp_path / "run").mkdir()
    held = lock_run_dir(tmp_path / "run")  # as the other training's process holds it
    try:
        with pytest.raises(CheckpointError) as refused:
            run(cfg)
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        assert str(refused.value) == (
            f"{tmp_path / 'run'} is in use by another training ({holder}); wait for it to end, or train "
            "into another run_dir."
        )
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    finally:
        held.close()
    assert run(cfg) == 0
    assert run(with_train(cfg, max_steps=4, resume="true")) == 0  # released at the end of each run


def test_patience_after_a_resume_from_an_off_schedule_validation_is_as_without_the_stop(toy_dir, tmp_path):
    """A run stopped at step 25 (time limit, max_steps) validates there, off the valid_every schedule.
    Its score may make best.pt, but patience compares the scheduled validations with each other only,
    so the continued run stops where one that never stopped does."""
    scores = {10: 1.0, 20: 2.0, 25: 5.0, 30: 3.0, 40: 4.0}  # BLEU by step; 25 only when stopped there

    def make(run: str, **changes) -> Trainer:
        cfg = tiny_config(toy_dir, tmp_path / run, valid_every=10, patience=1, **changes)
        trainer = make_trainer(cfg)
        trainer.validator.run = lambda model, step: {
            "loss": 1.0,
            "ppl": 2.7,
            "bleu": scores[step],
            "chrf": 1.0,
        }
        return trainer

    straight = make("straight", max_steps=40).train()
    assert (straight.state.step, straight.stop_reason) == (40, "reached train.max_steps=40")
    make("stopped", max_steps=25).train()
    resumed = make("stopped", max_steps=40, resume="true")
    resumed.resume(tmp_path / "stopped" / "checkpoints" / "latest.pt")
    result = resumed.train()
    assert (result.state.step, result.stop_reason) == (40, "reached train.max_steps=40")
    assert result.state.bad_validations == straight.state.bad_validations == 0
    assert (result.state.best_score, result.state.best_step) == (5.0, 25)  # best.pt: the stop's validation


def test_a_beam_wider_than_the_vocabulary_fails_before_training(toy_dir, tmp_path):
    cfg = tiny_config(toy_dir, tmp_path / "run")
    cfg = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, beam=1000))
    with pytest.raises(
        TrainingError,
        match=r"^decode.beam=1000 needs more than 1000 target tokens and the tokenizer has \d+; lower decode.beam\.$",
    ):
        make_trainer(cfg)


def test_a_validation_set_that_no_pair_of_fits_the_model_fails_before_training(tmp_path):
    from nmt.config import ConfigError
    from tests.conftest import write_toy_corpus

    toy = write_toy_corpus(tmp_path / "toy")
    for lang in ("en", "de"):  # every validation sentence three times as long as it was
        lines = (toy / f"val.{lang}").read_text(encoding="utf-8").splitlines()
        (toy / f"val.{lang}").write_text(
            "".join(" ".join([line] * 3) + "\n" for line in lines), encoding="utf-8"
        )
    cfg = tiny_config(toy, tmp_path / "run")
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, max_len=4),
        model=dataclasses.replace(cfg.model, max_positions=5),
    )
    with pytest.raises(
        ConfigError,
        match=r"^none of the 40 validation pairs fits model.max_positions=5 \(the shortest takes \d+ positions\); "
        r"raise model.max_positions\.$",
    ):
        make_trainer(cfg)


def test_warmup_longer_than_the_run_is_warned_about(toy_dir, tmp_path, caplog):
    cfg = tiny_config(toy_dir, tmp_path / "run", warmup_steps=100, max_steps=50)
    with caplog.at_level("WARNING", logger="nmt.trainer"):
        make_trainer(cfg)
    assert (
        "train.warmup_steps=100 > train.max_steps=50: the learning rate never reaches train.lr=0.003"
        in caplog.text
    )
    assert "far above" not in caplog.text


def test_a_learning_rate_far_above_adams_range_is_warned_about(toy_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="nmt.trainer"):
        make_trainer(tiny_config(toy_dir, tmp_path / "run", lr=0.9))
    assert "train.lr=0.9 is far above the 1e-4 to 2e-3 that AdamW trains Transformers with" in caplog.text


@pytest.fixture
def address_space_limited():
    """At most 4 GiB more address space for this test: an allocation past that fails at once, whatever
    the machine's overcommit setting."""
    import re
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (used + (4 << 30), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_model_too_big_for_memory_is_one_sentence(toy_dir, tmp_path, address_space_limited):
    cfg = tiny_config(toy_dir, tmp_path / "run")
    # d_model 1,000,000: one attention projection alone is 12 TB.
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, d_model=1_000_000, n_heads=1, ffn_dim=64)
    )
    with pytest.raises(
        TrainingError,
        match=r"^the model does not fit in memory: about [\d,]+M parameters .* choose a smaller model\.$",
    ):
        make_trainer(cfg)


def test_resuming_on_changed_data_says_so(toy_dir, tmp_path, caplog):
    """Training data edited in place, with as many lines (so as many batches), used to resume without
    a word; the same data resume silently."""
    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=2, valid_every=2)
    make_trainer(cfg).train()
    resumed = with_train(cfg, max_steps=4, resume="true")
    checkpoint = find_resume_checkpoint(resumed, Path(cfg.run_dir))

    def resume() -> str:
        caplog.clear()
        data = prepare_data(resumed.data, run_dir=Path(cfg.run_dir), resume_from=checkpoint)
        with caplog.at_level("WARNING", logger="nmt.trainer"):
            Trainer(resumed, data, Path(cfg.run_dir)).resume(checkpoint)
        return caplog.text

    assert "other" not in resume()
    # A filter setting that keeps the same pairs is the same data.
    resumed = dataclasses.replace(
        resumed, data=dataclasses.replace(resumed.data, max_len=resumed.data.max_len + 8)
    )
    assert "other" not in resume()
    train_de = toy_dir / "train.de"
    lines = train_de.read_text(encoding="utf-8").splitlines()
    train_de.write_text("".join(line[::-1] + "\n" for line in lines), encoding="utf-8")
    assert "was trained on other training data than this run reads" in resume()
    val_de = toy_dir / "val.de"
    val_de.write_text(val_de.read_text(encoding="utf-8").replace("a", "e"), encoding="utf-8")
    warning = resume()
    assert "other training and validation data" in warning and "not comparable" in warning
