"""Process-group set-up for ``torchrun`` (DDP). A plain ``python -m nmt.train`` is world size 1."""

from __future__ import annotations

import io
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's decision (stop / continue) for every rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def any_flags(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """Each flag true on every rank if it is true on any rank (one rank received SIGTERM, one rank's
    clock passed the time limit): decisions every rank must take together. One all-reduce."""
    if not info.enabled:
        return flags
    t = torch.tensor([1 if flag else 0 for flag in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def main_rank_outcome(error: BaseException | None, info: DistInfo) -> str | None:
    """Rank 0's outcome of work the other ranks wait for: its error's message, or None if it succeeded.

    Rank 0 passes its own error (or None); the others pass None and wait here, as at a barrier. A
    barrier alone would leave them a "connection closed" error when rank 0 stops, instead of its reason.
    """
    message = None if error is None else str(error) or type(error).__name__
    if not info.enabled:
        return message
    box = [message if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_main_rank_failure(error: Exception | None, info: DistInfo, wrap: type[Exception]) -> None:
    """Stop every rank when rank 0's work failed: rank 0 raises its ``error``, the others a ``wrap``
    saying "rank 0 stopped: " and its reason (see :func:`main_rank_outcome`)."""
    failure = main_rank_outcome(error, info)
    if error is not None:
        raise error
    if failure is not None:
        raise wrap(f"rank 0 stopped: {failure}")


def all_gather_floats(values: list[float], info: DistInfo, device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (the same length on each), in rank order, on every rank."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if not info.enabled:
        return [mine.tolist()]
    gathered = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(gathered, mine)
    return [t.tolist() for t in gathered]


def all_gather_state(state: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``state`` (tensors, numbers, strings, lists, dicts), in rank order, on every rank.

    Sent as ``torch.save`` bytes and read back with ``weights_only=True``: ``all_gather_object`` on
    tensors themselves fails to unpickle them (torch 2.13: "UntypedStorage has no attribute dtype").
    """
    if not info.enabled:
        return [state]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]


def disagreements(facts: dict[str, Any], info: DistInfo) -> list[str]:
    """How each rank's ``facts`` (name -> number or string) differ from rank 0's, one line per rank that
    differs, naming its host; the same list on every rank, so all of them can stop together."""
    if not info.enabled:
        return []
    ranks = all_gather_state({"host": socket.gethostname(), "facts": facts}, info)
    main = ranks[0]["facts"]
    lines = []
    for rank, theirs in enumerate(ranks[1:], start=1):
        differ = [
            f"{name} {_shown(value)} (rank 0: {_shown(main.get(name))})"
            for name, value in theirs["facts"].items()
            if value != main.get(name)
        ]
        if differ:
            lines.append(f"rank {rank} on {theirs['host']}: " + ", ".join(differ))
    return lines


def _shown(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else repr(value)
