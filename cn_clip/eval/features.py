"""Feature extraction, the one chain behind extraction (PyTorch and ONNX), zero-shot, one-command evaluation and
search: dataset → batches → this rank's share → loader → encoder (:func:`extract_dataset`), with
:func:`extract_images` / :func:`extract_texts` for the reference's LMDB and JSONL inputs and output files.

``extract_features(encoder, loader)`` runs any *encoder* — a callable from an input batch to unnormalised features:
a torch model method (:class:`TorchEncoder`) or an ONNX Runtime session (:class:`OnnxEncoder`) — over a loader of
``(positions, ids, inputs)`` batches, and returns L2-normalised float32 rows in dataset order, however the batches
were grouped (texts are batched by length so per-batch padding trimming saves work) or split across processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cn_clip.errors import CheckpointError, ConfigError
from cn_clip.runtime import DistEnv, barrier, check_precision, shard, weight_dtype

_logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------------- encoders
Encoder = Callable[[Any], Any]  # input batch (torch tensor) → unnormalised features [B, D] (torch or numpy)


class TorchEncoder:
    """``model.encode_image`` or ``model.encode_text`` on a device, run with the inference precision policy of
    :func:`cn_clip.runtime.inference_autocast` (``fp16``/``bf16`` models were converted when loaded)."""

    def __init__(self, fn: Callable[[Any], Any], device: str, precision: str = "fp32") -> None:
        self.fn = fn
        self.device = device
        self.precision = precision
        self.pin_memory = device.startswith("cuda")

    def __call__(self, batch: Any) -> Any:
        import torch

        from cn_clip.runtime import inference_autocast

        batch = batch.to(self.device, non_blocking=True)
        with torch.inference_mode(), inference_autocast(self.precision, self.device):
            return self.fn(batch)


class PrefixEncoder:
    """The first ``dim`` coordinates of another encoder's features, re-normalised: Matryoshka ``--dim`` for ONNX
    graphs, which always output the full width (:func:`cn_clip.models.matryoshka.truncate`)."""

    def __init__(self, inner: Encoder, dim: int) -> None:
        self.inner, self.dim = inner, dim
        self.pin_memory = getattr(inner, "pin_memory", False)

    def __call__(self, batch: Any) -> Any:
        import torch

        from cn_clip.models.matryoshka import truncate

        return truncate(torch.as_tensor(self.inner(batch)), self.dim)


class OnnxEncoder:
    """An ONNX Runtime session as an encoder (e.g. ``*.img.fp32.onnx`` with input ``image``, output
    ``unnorm_image_features``), built by :func:`cn_clip.deploy.onnx_export.create_session`. Fixed batch or
    sequence dimensions of the exported graph (the reference exports batch 1 and a fixed context) are honoured by
    running item by item and padding/cutting token columns."""

    pin_memory = False

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> None:
        from cn_clip.deploy.onnx_export import create_session

        self.session = create_session(path, device, threads)
        node = self.session.get_inputs()[0]
        self.input_name = node.name
        shape = node.shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_length = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        self.is_text = len(shape) == 2

    def __call__(self, batch: Any) -> np.ndarray:
        array = self.prepare(batch)
        if self.fixed_batch == 1 and len(array) != 1:
            return np.concatenate([self.run(array[i : i + 1]) for i in range(len(array))])
        return self.run(array)

    def prepare(self, batch: Any) -> np.ndarray:
        """The graph's input array: token ids trimmed of padding columns (dynamic sequence axis) or fitted to the
        graph's fixed context length."""
        import torch

        from cn_clip.models.text import trim_padding

        tensor = torch.as_tensor(batch).cpu()
        if not self.is_text:
            return tensor.numpy()
        if self.fixed_length is None:
            return trim_padding(tensor).numpy()
        tokens = tensor.numpy()
        if tokens.shape[1] >= self.fixed_length:
            return tokens[:, : self.fixed_length]
        return np.pad(tokens, ((0, 0), (0, self.fixed_length - tokens.shape[1])))

    def run(self, array: np.ndarray) -> np.ndarray:
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


def extract_dataset(
    encoder: Encoder,
    dataset: Any,
    batches: Sequence[list[int]],
    *,
    num_workers: int = 0,
    env: DistEnv | None = None,
    desc: str = "",
    progress: bool = True,
) -> Extracted:
    """Dataset → this rank's share of ``batches`` → loader → ``encoder``: the one extraction chain (features of
    this process only; :func:`gather_to_primary` merges the ranks)."""
    env = env or DistEnv()
    loader = make_loader(dataset, shard(batches, env), num_workers, pin_memory=getattr(encoder, "pin_memory", False))
    return extract_features(encoder, loader, desc=desc, progress=progress and env.is_primary)


@dataclass
class ExtractOptions:
    img_batch_size: int = 64
    text_batch_size: int = 64
    context_length: int = 52
    num_workers: int = 0
    npy_dtype: str = "float32"
    image_id_type: str = "auto"
    progress: bool = True
    source: dict = field(default_factory=dict)  # --dataset-type and file-list columns (data/sources.py)
    tokenizer: Any = None  # the architecture's (cn_clip.tokenizer.get_tokenizer); None = Chinese WordPiece


def extract_images(
    encoder: Encoder,
    image_data: str | os.PathLike,
    resolution: int,
    output: str | os.PathLike | None,
    opts: ExtractOptions,
    env: DistEnv | None = None,
) -> Extracted | None:
    """Image features of an imgs LMDB (or any reader of :mod:`cn_clip.data.sources`) in key order; written to
    ``output`` (if given) by rank 0 and returned there
    (None on the other ranks)."""
    from cn_clip.data.sources import image_dataset

    env = env or DistEnv()
    dataset = image_dataset(image_data, resolution=resolution, id_type=opts.image_id_type, **opts.source)
    batches = sequential_batches(len(dataset), opts.img_batch_size)
    part = extract_dataset(
        encoder, dataset, batches, num_workers=opts.num_workers, env=env, desc="images", progress=opts.progress
    )
    return _finish(part, output, "image_id", opts, env)


def extract_texts(
    encoder: Encoder,
    text_data: str | os.PathLike,
    output: str | os.PathLike | None,
    opts: ExtractOptions,
    env: DistEnv | None = None,
) -> Extracted | None:
    """Text features of a texts JSONL, batched by length, returned and written in file order."""
    from cn_clip.data.lmdb_dataset import JsonlTextDataset

    env = env or DistEnv()
    dataset = JsonlTextDataset(text_data, context_length=opts.context_length, tokenizer=opts.tokenizer)
    lengths = [len(text) for _, text in dataset.records]  # characters ≈ word pieces for Chinese text
    batches = length_grouped_batches(lengths, opts.text_batch_size)
    part = extract_dataset(
        encoder, dataset, batches, num_workers=opts.num_workers, env=env, desc="texts", progress=opts.progress
    )
    return _finish(part, output, "text_id", opts, env)


def _finish(
    part: Extracted, output: str | os.PathLike | None, id_key: str, opts: ExtractOptions, env: DistEnv
) -> Extracted | None:
    merged = gather_to_primary(part, output or f"./{id_key}_features", env)
    if merged is not None and output:
        write_features(output, merged, id_key, opts.npy_dtype)
    return merged


@dataclass
class FeatureJob:
    """One feature file to make: ``kind`` ``"text"`` (a texts JSONL) or ``"image"`` (an imgs LMDB at
    ``resolution``), read from ``data``, encoded by ``encoder`` (torch or ONNX), written to ``output``."""

    kind: str
    encoder: Encoder
    data: str
    output: str
    resolution: int = 0


def extract_files(
    jobs: Sequence[FeatureJob],
    opts: ExtractOptions,
    env: DistEnv | None = None,
    announce: Callable[[str], None] | None = None,
) -> dict[str, Extracted | None]:
    """Run ``jobs`` in order and write their files; the reference's progress lines (``Make inference for texts...``,
    ``N text features are stored in …``, ``Done!``) go to ``announce`` (a CLI passes ``print`` on rank 0)."""
    say = announce or (_logger.info if (env or DistEnv()).is_primary else _logger.debug)
    done: dict[str, Extracted | None] = {}
    unknown = [job.kind for job in jobs if job.kind not in ("text", "image")]
    if unknown:
        raise ConfigError(f"unknown feature job kind {unknown[0]!r}; use 'text' or 'image'")
    for job in jobs:
        say(f"Make inference for {job.kind}s...")
        if job.kind == "text":
            done[job.kind] = extract_texts(job.encoder, job.data, job.output, opts, env)
        else:
            done[job.kind] = extract_images(job.encoder, job.data, job.resolution, job.output, opts, env)
        if done[job.kind] is not None:
            say(f"{len(done[job.kind].ids)} {job.kind} features are stored in {job.output}")
    say("Done!")
    return done


def default_output_paths(text_data: str, output_format: str = "jsonl") -> tuple[str, str]:
    """(image, text) output paths derived, as the reference does, from the TEXT data path."""
    base = text_data.removesuffix(".jsonl")
    image = text_data.replace("_texts.jsonl", "_imgs")
    suffix = ".npy" if output_format == "npy" else ".jsonl"
    return f"{image}.img_feat{suffix}", f"{base}.txt_feat{suffix}"


# -------------------------------------------------------------------------------------------------- model
def load_eval_model(
    architecture: str | None,
    resume: str | os.PathLike | None,
    device: str = "cpu",
    precision: str = "fp32",
    announce: Callable[[str], None] | None = None,
    context_length: int | None = None,
    interpolate_positions: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Build ``vision@text`` (None: inferred from the checkpoint's shapes), strictly load ``resume`` (reference
    checkpoint layout, read once) and set the precision. Returns ``(model, metadata)``; metadata holds
    ``epoch``/``step`` and ``architecture``. ``context_length`` is checked against the text tower's position limit
    (stretched beyond it with ``interpolate_positions``, see :mod:`cn_clip.models.positions`). The reference's
    ``Begin to load …`` / ``=> loaded checkpoint …`` lines go to ``announce`` (a CLI passes ``print``), else to the
    log.
    """
    from cn_clip.models.factory import build_from_checkpoint, convert_weights, infer_architecture
    from cn_clip.weights import read_checkpoint, state_dict_of

    dtype = weight_dtype(check_precision(precision, device))
    if resume is None:
        raise ConfigError("--resume is required: the checkpoint whose features to compute")
    if not Path(resume).is_file():
        raise CheckpointError(f"The checkpoint file {resume} not exists!")
    say = announce or _logger.debug
    say(f"Begin to load model checkpoint from {resume}.")
    raw = read_checkpoint(resume)
    if architecture is None:
        architecture = infer_architecture(state_dict_of(raw, str(resume)))
        _logger.info("architecture inferred from %s: %s", resume, architecture)
    model, meta = build_from_checkpoint(architecture, raw, source=str(resume))
    del raw
    meta["architecture"] = architecture
    if context_length is not None:
        from cn_clip.models.positions import check_context_length

        check_context_length(model, context_length, interpolate_positions)
    model.to(device)
    if dtype is not None:
        convert_weights(model, dtype)
    model.eval()
    say(f"=> loaded checkpoint '{resume}' (epoch {meta.get('epoch', '?')} @ {meta.get('step', '?')} steps)")
    return model, meta


# ------------------------------------------------------------------------------------------- multi-process
EVAL_TIMEOUT_S = 2 * 3600


def join_processes(device: str | None = None) -> DistEnv:
    """This process's rank and device under torchrun (or alone). Eval joins a gloo group: its processes only meet
    at barriers, as features travel through files. Leave it with :func:`cn_clip.runtime.shutdown`."""
    from cn_clip.runtime import init_distributed

    return init_distributed(device=device, timeout_s=EVAL_TIMEOUT_S, backend="gloo")


def part_path(output: str | os.PathLike, env: DistEnv, rank: int | None = None) -> Path:
    output = Path(output)
    rank = env.rank if rank is None else rank
    return output.with_name(f".{output.name}.part{rank}-of-{env.world_size}.npz")


def save_part(part: Extracted, path: Path) -> None:
    import json

    from cn_clip.fileio import atomic_write

    with atomic_write(path, "wb") as handle:
        np.savez(handle, positions=part.positions, matrix=part.matrix, ids=np.array(json.dumps(part.ids)))


def load_part(path: Path) -> Extracted:
    import json

    with np.load(path) as data:
        return Extracted(data["positions"], json.loads(str(data["ids"])), data["matrix"])


def gather_to_primary(part: Extracted, output: str | os.PathLike, env: DistEnv) -> Extracted | None:
    """Single process: ``part`` itself. Under torchrun every rank saves its part beside ``output``; rank 0 merges
    them in dataset order and returns the whole, the others return None."""
    if env.world_size == 1:
        return part
    save_part(part, part_path(output, env))
    barrier(env)
    merged = None
    if env.is_primary:
        paths = [part_path(output, env, rank) for rank in range(env.world_size)]
        merged = merge_extracted([load_part(p) for p in paths])
        for path in paths:
            path.unlink()
    barrier(env)
    return merged


def write_features(path: str | os.PathLike, extracted: Extracted, id_key: str, npy_dtype: str = "float32") -> None:
    """``.npy`` paths get featio's npy pair, anything else the reference JSONL lines."""
    from cn_clip.eval.featio import write_features_jsonl, write_features_npy

    if str(path).endswith(".npy"):
        write_features_npy(path, extracted.ids, extracted.matrix, id_key, dtype=npy_dtype)
    else:
        write_features_jsonl(path, extracted.ids, extracted.matrix, id_key)
