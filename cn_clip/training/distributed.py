"""Process-group setup: one plain process (no launcher), ``torchrun`` (gloo on CPU, nccl on GPU) or ``deepspeed``.

The reference required ``LOCAL_RANK`` and NCCL (SPEC 12.17). Here a missing launcher means world size 1 with no
process group at all; every collective below is a no-op then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def is_local_primary(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def launched() -> bool:
    """True under torchrun / deepspeed / mpirun-style launchers (they set ``WORLD_SIZE`` and ``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(use_deepspeed: bool = False, device: str | None = None, timeout_s: int = 1800) -> DistEnv:
    """Detect the launcher, pick the device (``cuda:LOCAL_RANK`` if CUDA, else CPU) and join the process group."""
    local_rank = _env_int("LOCAL_RANK", 0)
    if device:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not launched():
        return DistEnv(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if use_deepspeed:
        from cn_clip.extras import require

        deepspeed = require("deepspeed", "--deepspeed")

        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    env = DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), dev, backend)
    _logger.debug("process group %s: rank %d/%d on %s", backend, env.rank, env.world_size, dev)
    return env


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


@contextlib.contextmanager
def local_primary_first(env: DistEnv) -> Iterator[None]:
    """Run the block on each node's local primary first while the node's other ranks wait at a barrier, then on
    them: a download into the shared cache happens once per node and the others find the verified file."""
    if not env.is_local_primary:
        barrier(env)
    yield
    if env.is_local_primary:
        barrier(env)


def cleanup(env: DistEnv) -> None:
    """Barrier, then leave the group (gloo aborts now and then when a rank leaves while another still talks)."""
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed and env.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_list(tensor: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """Every rank's tensor (same shape on all ranks), in rank order; no autograd."""
    if not env.distributed or env.world_size == 1:
        return [tensor]
    out = [torch.zeros_like(tensor) for _ in range(env.world_size)]
    dist.all_gather(out, tensor.contiguous())
    return out


def broadcast_object(obj, env: DistEnv, src: int = 0):
    if not env.distributed or env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
