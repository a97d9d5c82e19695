"""Device and precision policy (nmt.device), checked without a GPU by patching what torch reports."""

from __future__ import annotations

import logging

import pytest
import torch

from nmt.device import avoid_per_shape_attention_kernels, resolve_device, resolve_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a CUDA device is present; returns a setter for its bf16 support."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state["bf16"])
    return lambda bf16: state.update(bf16=bf16)


def test_auto_device_follows_cuda(monkeypatch, gpu):
    assert resolve_device("auto") == CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU


def test_asking_for_cuda_without_it_names_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ValueError, match=r"train.device=cuda:1 but CUDA is not available; use train.device=cpu"
    ):
        resolve_device("cuda:1", "train.device")


def test_auto_precision_by_device(gpu):
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", CUDA) == torch.bfloat16
    gpu(bf16=False)  # e.g. a T4 or V100: training takes fp16 with its gradient scaler, decoding fp32
    assert resolve_dtype("auto", CUDA, gpu_without_bf16=torch.float16) == torch.float16
    assert resolve_dtype("auto", CUDA) == torch.float32


def test_explicit_precision_and_its_errors():
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_dtype("fp16", CUDA) == torch.float16
    with pytest.raises(ValueError, match="--precision=fp16 needs a CUDA device"):
        resolve_dtype("fp16", CPU, "--precision")
    with pytest.raises(ValueError, match="dtype='half' is not valid; choose auto, fp32, bf16, fp16"):
        resolve_dtype("half", CPU)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_matmuls_warns(monkeypatch, caplog, native):
    monkeypatch.setattr("nmt.device.cpu_has_bf16_matmul", lambda: native)
    with caplog.at_level(logging.WARNING, logger="nmt.device"):
        assert resolve_dtype("bf16", CPU, "train.precision") == torch.bfloat16
        resolve_dtype("fp32", CPU, "train.precision")
    warned = [r.getMessage() for r in caplog.records if "bf16 matrix instructions" in r.getMessage()]
    assert len(warned) == (0 if native else 1)  # for bf16 only
    assert all(m.startswith("train.precision=bf16 on a CPU") for m in warned)


def test_cudnn_attention_is_switched_off_only_for_a_cuda_device(cudnn_attention_restored):
    torch.backends.cuda.enable_cudnn_sdp(True)
    avoid_per_shape_attention_kernels(CPU)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    avoid_per_shape_attention_kernels(CUDA)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
