"""Training and decoding on a CUDA device: the same properties as the CPU tests, on the GPU paths
(autocast, fused AdamW, pinned copies, SDPA's GPU kernels). Skipped where there is no GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nmt.checkpoint import find_resume_checkpoint
from nmt.translator import Translator
from tests.conftest import tiny_config
from tests.test_trainer import make_trainer, with_train
from tests.test_translator import SENTENCES, make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_training_on_cuda_autocasts_and_its_checkpoints_load_on_cpu(
    toy_dir, tmp_path, cudnn_attention_restored
):
    cfg = tiny_config(toy_dir, tmp_path / "run", device="cuda", precision="auto", max_steps=6, valid_every=3)
    trainer = make_trainer(cfg)
    assert trainer.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    result = trainer.train()
    assert result.state.step == 6
    assert all(math.isfinite(loss) for loss in result.state.losses)
    assert math.isfinite(result.last_valid["loss"])
    raw = torch.load(Path(cfg.run_dir) / "checkpoints" / "latest.pt", weights_only=True, map_location="cpu")
    assert all(t.device.type == "cpu" for t in raw["model"].values())
    assert raw["train_state"]["step"] == 6


def test_decoding_on_cuda_keeps_lines_and_greedy_equals_beam_one(tmp_path, cudnn_attention_restored):
    checkpoint = make_checkpoint(tmp_path / "best.pt")
    for dtype in ("fp32", "auto"):  # auto: bf16 where the GPU has it
        translator = Translator.from_checkpoint(checkpoint, device="cuda", dtype=dtype)
        greedy = translator.translate(SENTENCES, beam=1)
        assert greedy == [n[0].text for n in translator.translate_nbest(SENTENCES, nbest=1, beam=1)]
        out = translator.translate(["", *SENTENCES, ""], beam=3)
        assert len(out) == len(SENTENCES) + 2 and out[0] == out[-1] == ""


def test_compiled_training_on_cuda(toy_dir, tmp_path, cudnn_attention_restored):
    # train.compile=true with inductor's GPU kernels, under autocast; validation runs the plain model.
    torch._dynamo.reset()
    cfg = tiny_config(toy_dir, tmp_path / "run", device="cuda", max_steps=6, valid_every=3, compile=True)
    trainer = make_trainer(cfg)
    result = trainer.train()
    assert result.state.step == 6
    assert all(math.isfinite(loss) for loss in result.state.losses)
    assert math.isfinite(result.last_valid["loss"])


def test_training_resumes_on_cuda(toy_dir, tmp_path, cudnn_attention_restored):
    # The checkpoint's RNG states (CPU and CUDA generators) are restored from CPU tensors, and the
    # fused AdamW state moves back onto the GPU with the weights.
    cut = tiny_config(toy_dir, tmp_path / "run", device="cuda", precision="auto", max_steps=3)
    first = make_trainer(cut).train()
    resumed_cfg = with_train(cut, max_steps=6, resume="true")
    trainer = make_trainer(resumed_cfg)
    trainer.resume(find_resume_checkpoint(resumed_cfg, Path(cut.run_dir)))
    assert trainer.state.step == 3
    second = trainer.train()
    assert second.state.step == 6 and second.state.losses[:3] == first.state.losses
    assert all(math.isfinite(loss) for loss in second.state.losses)
    steps = {s["step"].item() for s in trainer.optimizer.state.values()}
    assert steps == {6.0} and all(p.is_cuda for p in trainer.raw_model.parameters())


def test_a_training_step_is_queued_without_waiting_for_the_gpu(toy_dir, tmp_path, cudnn_attention_restored):
    """Forward, backward, clipping, the skip decision and the update, and the copy of the step's numbers
    for the host, are queued without the host waiting for the GPU: CUDA's sync debug mode raises at any
    wait. (The trainer then reads step N once step N+1 is queued.)"""
    cfg = tiny_config(toy_dir, tmp_path / "run", device="cuda", precision="auto")
    trainer = make_trainer(cfg)
    stream = trainer._batch_stream()
    assert trainer.train_step([next(stream)]) is not None  # set-up: kernels, optimizer state, buffers
    batches = [next(stream) for _ in range(3)]
    steps = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            steps.append(trainer._update(trainer._backward([batch])))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = [trainer._read(step) for step in steps]
    assert all(s is not None and math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in stats)
