"""Where and how code runs: process groups, ranks, devices and precision — one copy for training, eval and search.

* Processes: one plain process (no launcher) or ``torchrun``/``deepspeed`` (they set ``WORLD_SIZE``/``RANK``/
  ``LOCAL_RANK``). :func:`init_distributed` reads the environment, picks the device and joins the process group;
  without a launcher there is no group and every collective below is a no-op (the reference required
  ``LOCAL_RANK`` and NCCL, so it could not run on one CPU).
* Work sharing: :func:`shard` gives each rank its round-robin share of a list of work items.
* Devices: :func:`resolve_device` — the one device default (``cuda:LOCAL_RANK`` when CUDA is there, else ``cpu``).
* Precision: :data:`PRECISIONS`, :func:`check_precision`, the autocast dtype of training, the inference autocast and
  the weight dtype of converted models.

Nothing heavy at import: ``cli/args.py`` imports :data:`PRECISIONS` from here; torch is imported inside functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from cn_clip.errors import ConfigError

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

PRECISIONS = ("amp", "fp16", "fp32", "bf16")
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------- devices
def resolve_device(device: str | None = None, *, per_rank: bool = True) -> str:
    """``device`` as given, else ``cuda:{LOCAL_RANK}`` (``cuda`` when not ``per_rank``) if CUDA is available, else
    ``cpu``."""
    if device:
        return str(device)
    import torch

    if torch.cuda.is_available():
        return f"cuda:{_env_int('LOCAL_RANK', 0)}" if per_rank else "cuda"
    return "cpu"


# ----------------------------------------------------------------------------------------------- precision
def check_precision(precision: str, device: str | None = None) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a :class:`ConfigError`; warns about slow choices."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "fp16" and device is not None and str(device) == "cpu":
        _logger.warning("--precision fp16 on the CPU is slow; fp32 or bf16 are faster there")
    return precision


def weight_dtype(precision: str) -> torch.dtype | None:
    """Inference: the dtype a model's weights are converted to (the reference's mixed precision), None for fp32
    weights (``fp32`` and ``amp``)."""
    import torch

    check_precision(precision)
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Training (fp32 master weights): ``bf16`` autocasts to bfloat16 anywhere; ``amp``/``fp16`` to float16 on an
    accelerator; on a CPU and for ``fp32`` no autocast (None)."""
    import torch

    check_precision(precision)
    if precision == "bf16":
        return torch.bfloat16
    if precision in ("amp", "fp16") and device.type != "cpu":
        return torch.float16
    return None


def inference_autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """Inference: ``amp`` runs fp32 weights under float16 autocast on CUDA, plain fp32 elsewhere (the reference's
    ``amp`` was plain fp32 everywhere); converted ``fp16``/``bf16`` models and ``fp32`` need no autocast."""
    if precision == "amp" and str(device).startswith("cuda"):
        import torch

        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- process groups
def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclasses.dataclass
class DistEnv:
    """This process's place in the run: rank, local rank, world size, device and the process group's back end."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=_cpu)
    backend: str | None = None  # None: no process group

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def is_local_primary(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        import torch.distributed as dist

        return self.backend is not None and dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def launched() -> bool:
    """True under torchrun / deepspeed / mpirun-style launchers (they set ``WORLD_SIZE`` and ``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(
    use_deepspeed: bool = False, device: str | None = None, timeout_s: int = 1800, backend: str | None = None
) -> DistEnv:
    """Detect the launcher, pick the device (:func:`resolve_device`) and join the process group.

    ``backend`` None: ``nccl`` on CUDA, else ``gloo`` (training's collectives); eval passes ``gloo`` because its
    processes only meet at barriers (features travel through files).
    """
    import torch
    import torch.distributed as dist

    dev = torch.device(resolve_device(device))
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    if not launched():
        return DistEnv(local_rank=_env_int("LOCAL_RANK", 0), device=dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    env = DistEnv(dist.get_rank(), _env_int("LOCAL_RANK", 0), dist.get_world_size(), dev, backend)
    _logger.debug("process group %s: rank %d/%d on %s", backend, env.rank, env.world_size, dev)
    return env


def barrier(env: DistEnv) -> None:
    if env.distributed:
        import torch.distributed as dist

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


def shutdown() -> None:
    """Leave the process group if one was joined (no barrier: safe after an error on one rank)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cleanup(env: DistEnv) -> None:
    """Barrier, then leave the group (gloo aborts now and then when a rank leaves while another still talks)."""
    if env.distributed:
        barrier(env)
        shutdown()


def shard(items: Sequence[T], env: DistEnv) -> list[T]:
    """This rank's round-robin share of ``items`` (equal work when the items are sorted by cost)."""
    return list(items[env.rank :: env.world_size])


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed and env.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_list(tensor: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """Every rank's tensor (same shape on all ranks), in rank order; no autograd."""
    if not env.distributed or env.world_size == 1:
        return [tensor]
    import torch
    import torch.distributed as dist

    out = [torch.zeros_like(tensor) for _ in range(env.world_size)]
    dist.all_gather(out, tensor.contiguous())
    return out


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    if not env.distributed or env.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
