"""Where and in which precision a model runs: one policy for training, decoding and the benchmarks."""

from __future__ import annotations

import logging
import platform

import torch

from nmt.config import ConfigError, first_line

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device, setting: str = "device") -> torch.device:
    """``"auto"`` = the first CUDA device if there is one, else the CPU. ``setting`` names the
    option in error messages (``train.device``, ``--device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"{setting}={name!r} is not a device ({e}); use auto, cpu, cuda or cuda:N.") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name} but CUDA is not available; use {setting}=cpu.")
    if device.type not in ("cpu", "cuda"):  # mps, xpu, ...: PyTorch knows the name; is it here?
        try:
            torch.empty(1, device=device).cpu()
        except (RuntimeError, NotImplementedError, AssertionError) as e:
            raise ConfigError(
                f"{setting}={name} cannot be used here ({first_line(e)}); use {setting}=cpu."
            ) from None
    return device


def resolve_dtype(
    precision: str,
    device: torch.device,
    setting: str = "dtype",
    gpu_without_bf16: torch.dtype = torch.float32,
) -> torch.dtype:
    """``"auto"`` = bf16 on a GPU that has it, ``gpu_without_bf16`` on an older GPU (training passes
    fp16, which its gradient scaler handles), fp32 on the CPU (where bf16 matmuls are slower)."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else gpu_without_bf16
    if precision not in DTYPES:
        raise ValueError(f"{setting}={precision!r} is not valid; choose auto, {', '.join(DTYPES)}.")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"{setting}=fp16 needs a CUDA device; use fp32 or bf16 on the CPU.")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_matmul():
        log.warning(
            "%s=bf16 on a CPU without bf16 matrix instructions (%s): its bf16 matrix products are "
            "emulated, many times slower than fp32 (a training step of the tiny model took 18x as long "
            "on a 2-core AVX2 machine); fp32, the CPU's default, is faster.",
            setting,
            torch.backends.cpu.get_cpu_capability(),
        )
    return DTYPES[precision]


def cpu_has_bf16_matmul() -> bool:
    """Whether PyTorch's oneDNN multiplies bf16 matrices with this CPU's own instructions (AVX-512 and
    later); on AVX2 CPUs bf16 products take a generic path (a (3800, 64) x (64, 8000) product: 1.5 s in
    bf16 against 0.1 s in fp32 on 2 cores)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo``; the platform's words elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        return names[0] if names else model
    except OSError:
        return model


def avoid_per_shape_attention_kernels(device: torch.device) -> None:
    """On a CUDA ``device``, keep SDPA to kernels that need no set-up per tensor shape (flash,
    memory-efficient).

    On Hopper GPUs PyTorch prefers cuDNN's attention, which builds a kernel graph for every new
    (batch, heads, query length, key length) and caches it: a few hundred milliseconds each time. A
    translation batch has a new shape almost every step (batches are cut by tokens, and beam search
    grows the key length by one per step): on an H100 the median training step of Transformer base took
    382 ms with cuDNN's kernels and 43 ms without (docs/performance.md, log item 14). Process-wide; the
    trainer, the translator and the benchmarks call it with the device they run on.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
