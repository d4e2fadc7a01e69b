"""Feature extraction shared by extraction, zero-shot, one-command evaluation and search.

``extract_features(encoder, loader)`` runs any *encoder* — a callable from an input batch to unnormalised features:
a torch model method (:class:`TorchEncoder`) or an ONNX Runtime session (:class:`OnnxEncoder`) — over a loader of
``(positions, ids, inputs)`` batches, and returns L2-normalised float32 rows in dataset order, however the batches
were grouped (texts are batched by length so per-batch padding trimming saves work) or split across processes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cn_clip.errors import CheckpointError, ConfigError

_logger = logging.getLogger(__name__)

PRECISIONS = ("amp", "fp16", "fp32", "bf16")
Batch = tuple[list[int], list[Any], Any]  # (dataset positions, ids, stacked inputs)


# ---------------------------------------------------------------------------------------------- data plumbing
class Indexed:
    """Wrap a dataset of ``(id, input)`` items so each item also carries its position: ``(position, id, input)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any, Any]:
        item_id, value = self.dataset[index]
        return index, item_id, value


def collate(items: Sequence[tuple[int, Any, Any]]) -> Batch:
    """Positions and ids stay Python lists (ids may mix int and str); inputs are stacked."""
    import torch

    positions, ids, values = zip(*items, strict=True)
    return list(positions), list(ids), torch.stack(list(values))


def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of positions with similar lengths (stable sort, longest first) so trimming the padding of each
    batch removes most of it. Results are put back in dataset order by :func:`extract_features`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def shard(batches: Sequence[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Round-robin share of the batches for one process (equal work when batches are length-sorted)."""
    return list(batches[rank::world_size])


def make_loader(dataset: Any, batches: Sequence[list[int]], num_workers: int, pin_memory: bool = False) -> Any:
    """A DataLoader over ``Indexed(dataset)`` with a fixed batch list; workers read items by index and open their
    own LMDB handles (the datasets open them lazily per process)."""
    from torch.utils.data import DataLoader

    return DataLoader(
        Indexed(dataset),
        batch_sampler=list(batches),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
    )


def default_num_workers() -> int:
    """Up to 4 reader processes, leaving one core to the model."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


# ------------------------------------------------------------------------------------------------- encoders
Encoder = Callable[[Any], Any]  # input batch (torch tensor) → unnormalised features [B, D] (torch or numpy)


class TorchEncoder:
    """``model.encode_image`` or ``model.encode_text`` on a device, with the precision policy of ``precision``.

    ``amp``: fp32 weights; on CUDA the forward runs under ``torch.autocast(float16)``, on CPU/MPS plain fp32 (the
    reference's ``amp`` was plain fp32 everywhere). ``fp16``/``bf16``: the model was converted with the reference's
    mixed-precision rule. ``fp32``: no autocast (bit-for-bit the reference's numbers).
    """

    def __init__(self, fn: Callable[[Any], Any], device: str, precision: str = "fp32") -> None:
        self.fn = fn
        self.device = device
        self.precision = precision

    def __call__(self, batch: Any) -> Any:
        import torch

        batch = batch.to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self.precision == "amp" and self.device.startswith("cuda"):
                with torch.autocast("cuda", dtype=torch.float16):
                    return self.fn(batch)
            return self.fn(batch)


class OnnxEncoder:
    """An ONNX Runtime session as an encoder (e.g. ``*.img.fp32.onnx`` with input ``image``, output
    ``unnorm_image_features``). Fixed batch or sequence dimensions of the exported graph (the reference exports
    batch 1 and a fixed context) are honoured by running item by item and padding/cutting token columns."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise ConfigError(f"ONNX model not found: {path}")
        self.session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        node = self.session.get_inputs()[0]
        self.input_name = node.name
        shape = node.shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_length = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        self.is_text = len(shape) == 2

    def __call__(self, batch: Any) -> np.ndarray:
        array = batch.cpu().numpy() if hasattr(batch, "cpu") else np.asarray(batch)
        if self.is_text:
            array = self._fit_tokens(array)
        if self.fixed_batch == 1 and len(array) != 1:
            return np.concatenate([self._run(array[i : i + 1]) for i in range(len(array))])
        return self._run(array)

    def _fit_tokens(self, tokens: np.ndarray) -> np.ndarray:
        if self.fixed_length is None:  # dynamic sequence axis: drop the all-padding columns
            used = np.flatnonzero((tokens != 0).any(axis=0))
            return tokens[:, : (int(used[-1]) + 1 if used.size else 1)]
        if tokens.shape[1] >= self.fixed_length:
            return tokens[:, : self.fixed_length]
        return np.pad(tokens, ((0, 0), (0, self.fixed_length - tokens.shape[1])))

    def _run(self, array: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: array})[0]


# ------------------------------------------------------------------------------------------------ extraction
@dataclass
class Extracted:
    """L2-normalised features of the items this process extracted, with their dataset positions."""

    positions: np.ndarray  # [n] int64
    ids: list[Any] = field(default_factory=list)
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # [n, D] float32


def l2_normalize(features: Any) -> np.ndarray:
    """Rows divided by their L2 norm, computed in float32 (fp16/bf16 outputs are upcast first)."""
    import torch

    tensor = torch.as_tensor(features).float()
    return (tensor / tensor.norm(dim=-1, keepdim=True)).cpu().numpy()


def extract_features(
    encoder: Encoder, loader: Iterable[Batch], *, desc: str = "", progress: bool = True, total: int | None = None
) -> Extracted:
    """Run ``encoder`` over every batch; rows come back sorted by dataset position (original order)."""
    from tqdm import tqdm

    positions: list[int] = []
    ids: list[Any] = []
    rows: list[np.ndarray] = []
    for batch_positions, batch_ids, inputs in tqdm(loader, desc=desc or None, disable=not progress, total=total):
        rows.append(l2_normalize(encoder(inputs)))
        positions.extend(batch_positions)
        ids.extend(batch_ids)
    if not rows:
        return Extracted(np.zeros(0, np.int64))
    order = np.argsort(np.asarray(positions, dtype=np.int64), kind="stable")
    matrix = np.concatenate(rows)[order]
    return Extracted(np.asarray(positions, dtype=np.int64)[order], [ids[i] for i in order], matrix)


def merge_extracted(parts: Sequence[Extracted]) -> Extracted:
    """Merge the shards of several processes back into dataset order."""
    parts = [p for p in parts if len(p.positions)]
    if not parts:
        return Extracted(np.zeros(0, np.int64))
    positions = np.concatenate([p.positions for p in parts])
    order = np.argsort(positions, kind="stable")
    ids = [item for p in parts for item in p.ids]
    return Extracted(positions[order], [ids[i] for i in order], np.concatenate([p.matrix for p in parts])[order])


# -------------------------------------------------------------------------------------------------- model
def resolve_device(device: str | None = None) -> str:
    """``device`` as given, else ``cuda:{LOCAL_RANK}`` when CUDA is available, else ``cpu``."""
    if device:
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_eval_model(
    architecture: str | None,
    resume: str | os.PathLike | None,
    device: str = "cpu",
    precision: str = "fp32",
    announce: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Build ``vision@text`` (None: inferred from the checkpoint's shapes), strictly load ``resume`` (reference
    checkpoint layout, read once) and set the precision. Returns ``(model, metadata)``; metadata holds
    ``epoch``/``step`` and ``architecture``. Prints the reference's ``=> loaded checkpoint`` line when ``announce``.
    """
    from cn_clip.models.factory import build_from_checkpoint, convert_weights, infer_architecture
    from cn_clip.weights import read_checkpoint, state_dict_of

    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if resume is None:
        raise ConfigError("--resume is required: the checkpoint whose features to compute")
    if not Path(resume).is_file():
        raise CheckpointError(f"The checkpoint file {resume} not exists!")
    if announce:
        print(f"Begin to load model checkpoint from {resume}.")
    raw = read_checkpoint(resume)
    if architecture is None:
        architecture = infer_architecture(state_dict_of(raw, str(resume)))
        _logger.info("architecture inferred from %s: %s", resume, architecture)
    model, meta = build_from_checkpoint(architecture, raw, source=str(resume))
    del raw
    meta["architecture"] = architecture
    model.to(device)
    if precision in ("fp16", "bf16"):
        import torch

        if device == "cpu" and precision == "fp16":
            _logger.warning("--precision fp16 on the CPU is slow; fp32 or bf16 are faster there")
        convert_weights(model, torch.float16 if precision == "fp16" else torch.bfloat16)
    model.eval()
    if announce:
        print(f"=> loaded checkpoint '{resume}' (epoch {meta.get('epoch', '?')} @ {meta.get('step', '?')} steps)")
    return model, meta


def print_params(args: Any) -> None:
    """The reference's ``Params:`` block (sorted ``name: value`` lines)."""
    print("Params:")
    for name in sorted(vars(args)):
        print(f"  {name}: {getattr(args, name)}")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------- multi-process
@dataclass(frozen=True)
class Shard:
    """Which slice of the work this process does (``RANK``/``WORLD_SIZE`` as set by torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def shard_from_env() -> Shard:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world_size > 1:
        _init_process_group()
    return Shard(rank, world_size)


def _init_process_group() -> None:
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        # gloo: the processes only meet at barriers (features travel through files), on CPU or GPU hosts alike.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))


def finish_distributed() -> None:
    """Tear down the process group this module started (torchrun runs), so processes exit cleanly."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(shard: Shard) -> None:
    if shard.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def part_path(output: str | os.PathLike, shard: Shard, rank: int | None = None) -> Path:
    output = Path(output)
    rank = shard.rank if rank is None else rank
    return output.with_name(f".{output.name}.part{rank}-of-{shard.world_size}.npz")


def save_part(part: Extracted, path: Path) -> None:
    import json

    from cn_clip.fileio import atomic_write

    with atomic_write(path, "wb") as handle:
        np.savez(handle, positions=part.positions, matrix=part.matrix, ids=np.array(json.dumps(part.ids)))


def load_part(path: Path) -> Extracted:
    import json

    with np.load(path) as data:
        return Extracted(data["positions"], json.loads(str(data["ids"])), data["matrix"])


def gather_to_primary(part: Extracted, output: str | os.PathLike, shard: Shard) -> Extracted | None:
    """Single process: ``part`` itself. Under torchrun every rank saves its part beside ``output``; rank 0 merges
    them in dataset order and returns the whole, the others return None."""
    if shard.world_size == 1:
        return part
    save_part(part, part_path(output, shard))
    barrier(shard)
    merged = None
    if shard.is_primary:
        paths = [part_path(output, shard, rank) for rank in range(shard.world_size)]
        merged = merge_extracted([load_part(p) for p in paths])
        for path in paths:
            path.unlink()
    barrier(shard)
    return merged


def write_features(path: str | os.PathLike, extracted: Extracted, id_key: str, npy_dtype: str = "float32") -> None:
    """``.npy`` paths get featio's npy pair, anything else the reference JSONL lines."""
    from cn_clip.eval.featio import write_features_jsonl, write_features_npy

    if str(path).endswith(".npy"):
        write_features_npy(path, extracted.ids, extracted.matrix, id_key, dtype=npy_dtype)
    else:
        write_features_jsonl(path, extracted.ids, extracted.matrix, id_key)
