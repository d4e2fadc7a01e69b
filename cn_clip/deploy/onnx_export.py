"""ONNX export of the two encoders: dynamic axes, relocatable external data, fp16 and int8 variants, parity checks.

File and tensor names are the reference's: ``{prefix}.img.fp32.onnx`` (input ``image`` [B, 3, R, R] float32, output
``unnorm_image_features`` [B, D]) and ``{prefix}.txt.fp32.onnx`` (input ``text`` [B, L] int64, output
``unnorm_text_features`` [B, D]); ``fp16`` and ``int8`` variants keep float32/int64 inputs and outputs.
Unlike the reference, batch (and, for text, sequence length) are dynamic, and every file is checked against PyTorch
before it is moved into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cn_clip.errors import CnClipError, ConfigError
from cn_clip.extras import require

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from cn_clip.models.clip_model import CLIP

_logger = logging.getLogger(__name__)

EXPORT_OPSET = 17  # first opset with LayerNormalization as one op, so fp16 export can keep it in fp32
PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Additive mask for padding: the reference's -10000 (exp underflows to exactly 0 in fp32, and it fits fp16).
MASK_VALUE = -10000.0
# Ops kept in fp32 by the fp16 conversion: normalisation and softmax overflow or lose precision in half.
FP16_KEEP_FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "Exp")
ENCODER_IO = {
    "img": ("image", "unnorm_image_features"),
    "txt": ("text", "unnorm_text_features"),
}
# Minimum cosine to PyTorch fp32 over the parity inputs; measured margins are in docs/deploy.md.
MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}
PARITY_CAPTIONS = (
    "杰尼龟",
    "妙蛙种子",
    "一只在草地上奔跑的金毛小狗",
    "高级感托特包斜挎，大容量通勤女包",
    "Hello, World! Café “引号” iPhone13手机壳",
    "夕阳下的海边，一对情侣牵着手散步，远处有几艘渔船慢慢驶回港口，天空被染成了橙红色，非常浪漫的一幕。" * 2,
)


class ParityError(CnClipError):
    """An exported graph does not reproduce the PyTorch features within the documented threshold."""


class ImageEncoder(nn.Module):
    """Export wrapper of the image tower: ``image`` [B, 3, R, R] → unnormalised features [B, D]."""

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(image)


class TextEncoder(nn.Module):
    """Export wrapper of the text tower: padding (id 0) is masked inside the graph instead of trimmed.

    PyTorch's ``encode_text`` drops padding columns per batch, which a traced graph cannot do; masking them with
    the reference's additive -10000 gives the same [CLS] feature for any amount of padding, so one graph serves
    every sequence length.
    """

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, text: torch.Tensor) -> torch.Tensor:  # [B, L] int64 → [B, D]
        if self.clip.cfg.text.kind == "hf":  # a Hugging Face tower masks its own padding
            return self.clip.text(text, trim=False).to(self.clip.dtype)
        bert = self.clip.bert
        hidden = bert.embeddings(input_ids=text)  # [B, L, H]
        pad = (text == 0)[:, None, None, :].to(hidden.dtype)  # [B, 1, 1, L]
        hidden = bert.encoder(hidden, attention_mask=pad * MASK_VALUE)[0]
        return hidden[:, 0].to(self.clip.dtype) @ self.clip.text_projection.to(self.clip.dtype)


def onnx_path(prefix: str | os.PathLike, kind: str, precision: str) -> Path:
    """``{prefix}.{img|txt}.{fp32|fp16|int8}.onnx`` (the reference's names, plus int8)."""
    return Path(f"{prefix}.{kind}.{precision}.onnx")


def external_data_name(path: str | os.PathLike) -> str:
    """Name of the single weights file kept beside a large model (relative, so the pair can be moved together)."""
    return f"{Path(path).name}.extra_file"


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------


def dummy_input(model: CLIP, kind: str, batch_size: int = 2, context_length: int = 52) -> torch.Tensor:
    """Tracing input. Text gets real tokens and padding so the traced graph contains the masking path."""
    if kind == "img":
        res = model.cfg.vision.image_resolution
        return torch.zeros(batch_size, 3, res, res)
    from cn_clip.tokenizer import get_tokenizer

    return get_tokenizer(model.cfg)(list(PARITY_CAPTIONS[:batch_size]), context_length)


def torch_export(model: CLIP, kind: str, path: Path, context_length: int = 52, opset: int = EXPORT_OPSET) -> None:
    """Trace one encoder to ``path`` with dynamic batch (and sequence) axes.

    Uses the TorchScript exporter (``dynamo=False``): it handles transformers' BERT and our towers in about a
    second per tiny model and needs no ``torch.export`` shape constraints; the dynamo exporter is slower to run and
    specialises some shapes of transformers' mask code.
    """
    require("onnx", "ONNX export")
    input_name, output_name = ENCODER_IO[kind]
    wrapper = (ImageEncoder(model) if kind == "img" else TextEncoder(model)).eval()
    axes = {0: "batch"} if kind == "img" else {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; parity is checked afterwards
        torch.onnx.export(
            wrapper,
            (dummy_input(model, kind, context_length=context_length),),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: axes, output_name: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def model_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (raw data), an estimate of the serialised size."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: Path, external_data: bool | None = None) -> None:
    """Save ``model``; weights go into ONE relative external file when it exceeds 2 GB (or ``external_data``)."""
    onnx = require("onnx", "ONNX export")

    use_external = model_bytes(model) > PROTOBUF_LIMIT_BYTES * 0.9 if external_data is None else external_data
    for stale in (path, path.parent / external_data_name(path)):
        stale.unlink(missing_ok=True)
    if use_external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external_data_name(path),
            size_threshold=1024,
            convert_attribute=True,
        )
    else:
        onnx.save_model(model, str(path))


def load_model(path: Path) -> onnx.ModelProto:
    onnx = require("onnx", "ONNX export")

    return onnx.load(str(path), load_external_data=True)


def unshare_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``Identity(initializer)`` nodes by copies of the initializer, in place.

    The exporter de-duplicates equal weights (e.g. LayerNorm scales that are still all ones) and feeds the copies
    through Identity nodes; a weight shared by an fp32 LayerNorm and an fp16 node could not keep both types.
    """
    onnx = require("onnx", "ONNX export")

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model


def to_fp16(source: Path) -> onnx.ModelProto:
    """Half-precision weights and matmuls; LayerNorm, softmax and the activations' exp/erf stay fp32; fp32 I/O.

    Takes a path so that shape inference works for models over 2 GB (onnx's path-based inference).
    """
    require("onnxruntime", "fp16 ONNX export")
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(
        str(source),
        keep_io_types=True,
        disable_shape_infer=False,  # the converter needs value types to insert casts around the fp32 ops
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32_OPS],
    )


def quantize_int8(source: Path) -> onnx.ModelProto:
    """Dynamic int8 quantisation of the MatMul/Gemm weights (activations quantised per call) for CPU serving.

    Weights are signed int8 with ``reduce_range`` (7-bit): on AVX2 CPUs without VNNI the u8×s8 kernels can
    saturate with full-range weights (onnxruntime's quantisation guide).
    """
    require("onnxruntime", "int8 ONNX export")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = Path(tmp) / "int8.onnx"
        was_disabled, root.disabled = root.disabled, True  # silence its "consider pre-processing" root warning
        try:
            quantize_dynamic(
                source,
                target,
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=False,
                reduce_range=True,
                weight_type=QuantType.QInt8,
                use_external_data_format=True,  # always valid; save_model below decides the final layout
            )
        finally:
            root.disabled = was_disabled
        return load_model(target)


# --------------------------------------------------------------------------------------------------------------------
# Running graphs
# --------------------------------------------------------------------------------------------------------------------


def providers_for(device: str) -> list[str]:
    """onnxruntime execution providers for ``cpu`` / ``cuda``; a missing CUDA provider is a warning, not a crash."""
    onnxruntime = require("onnxruntime", "running ONNX models")

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise ConfigError(f"unknown device {device!r}; use cpu or cuda")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        _logger.warning(
            "--device cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); running on CPU"
        )
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def create_session(
    path: str | os.PathLike, device: str = "cpu", threads: int | None = None
) -> onnxruntime.InferenceSession:
    """An inference session for ``path`` (external data resolved relative to the model file)."""
    onnxruntime = require("onnxruntime", "running ONNX models")

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ONNX model {path} does not exist")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers_for(device))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types for unreadable files
        raise ConfigError(f"onnxruntime cannot load {path}: {exc}") from exc


def run_session(session: onnxruntime.InferenceSession, inputs: np.ndarray) -> np.ndarray:
    """Run a one-input, one-output encoder graph."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: inputs})[0]


# --------------------------------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityReport:
    name: str
    max_abs_diff: float
    min_cosine: float
    threshold: float
    count: int

    @property
    def ok(self) -> bool:
        return self.min_cosine >= self.threshold

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"[parity] {self.name}: max_abs_diff={self.max_abs_diff:.3g}, min_cosine={self.min_cosine:.7f} "
            f"over {self.count} inputs (threshold {self.threshold}) {verdict}"
        )


def real_image(size: tuple[int, int] = (451, 300)) -> Any:
    """A real photograph when scikit-image is installed (``chelsea``, non-square), else a smooth synthetic scene."""
    from PIL import Image

    try:
        from skimage import data

        return Image.fromarray(data.chelsea())
    except ImportError:
        width, height = size
        yy, xx = np.mgrid[0:height, 0:width]
        pixels = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], axis=-1)
        return Image.fromarray(pixels.astype(np.uint8))


def parity_inputs(model: CLIP, kind: str, context_length: int = 52, seed: int = 0) -> list[torch.Tensor]:
    """Batches of random and real inputs: several batch sizes, and for text several padded lengths."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "img":
        from cn_clip.transforms import image_transform

        res = model.cfg.vision.image_resolution
        real = image_transform(res)(real_image()).unsqueeze(0)
        return [real, torch.randn(3, 3, res, res, generator=gen)]
    from cn_clip.tokenizer import tokenize

    if model.cfg.text.kind == "hf":
        return _hf_parity_texts(model, context_length, gen)
    captions = tokenize(list(PARITY_CAPTIONS), context_length=context_length)
    vocab = model.cfg.text.vocab_size
    rand = torch.randint(106, vocab, (4, context_length), generator=gen)
    rand[:, 0], rand[:, -1] = 101, 102
    short = captions[:, : max(8, context_length // 4)].clone()
    short[:, -1] = torch.where(short[:, -1] != 0, torch.full_like(short[:, -1], 102), short[:, -1])
    return [captions, captions[:1], rand, short]


def _hf_parity_texts(model: CLIP, context_length: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Captions through the tower's tokenizer, random ids framed by its first and end tokens, and cut rows."""
    from cn_clip.tokenizer import get_tokenizer

    pad = model.text.pad_id
    captions = get_tokenizer(model.cfg)(list(PARITY_CAPTIONS), context_length)
    ends = (captions != pad).long().cumsum(1).argmax(1)  # [N] position of each row's end token
    start, end = captions[0, 0], captions[0, ends[0]]
    rand = torch.randint(0, model.text.transformer.config.vocab_size, (4, context_length), generator=gen)
    rand[rand == pad] = start
    rand[:, 0], rand[:, -1] = start, end
    short = captions[:, : max(8, context_length // 4)].clone()
    short[:, -1] = torch.where(short[:, -1] != pad, end, short[:, -1])
    return [captions, captions[:1], rand, short]


def reference_features(model: CLIP, kind: str, batch: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        out = model.encode_image(batch) if kind == "img" else model.encode_text(batch)
    return out.float().numpy()


def compare(name: str, expected: np.ndarray, actual: np.ndarray, threshold: float) -> ParityReport:
    """Max |difference| and the smallest per-row cosine between two [N, D] feature matrices."""
    expected, actual = expected.astype(np.float64), actual.astype(np.float64)
    if expected.shape != actual.shape:
        raise ParityError(f"{name}: output shape {actual.shape} differs from PyTorch's {expected.shape}")
    if not np.isfinite(actual).all():
        return ParityReport(name, float("inf"), float("-inf"), threshold, len(actual))
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1)
    cosine = (expected * actual).sum(axis=1) / np.maximum(norms, 1e-30)
    return ParityReport(name, float(np.abs(expected - actual).max()), float(cosine.min()), threshold, len(actual))


def check_parity(
    model: CLIP, kind: str, path: Path, precision: str, context_length: int = 52, device: str = "cpu"
) -> ParityReport:
    """Run ``path`` in onnxruntime on :func:`parity_inputs` and compare with the PyTorch fp32 model."""
    session = create_session(path, device)
    expected, actual = [], []
    for batch in parity_inputs(model, kind, context_length):
        expected.append(reference_features(model, kind, batch))
        actual.append(run_session(session, batch.numpy()))
    return compare(f"{path.name}", np.concatenate(expected), np.concatenate(actual), MIN_COSINE[precision])


# --------------------------------------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    paths: dict[str, Path]
    reports: list[ParityReport]


@contextlib.contextmanager
def _staging_dir(target_dir: Path) -> Iterator[Path]:
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-export.", dir=target_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(staged: Path, final: Path) -> None:
    """Move a model (and its external-data file) into place; weights first, so the model never dangles."""
    extra = staged.parent / external_data_name(staged)
    final_extra = final.parent / external_data_name(final)
    if extra.exists():
        os.replace(extra, final_extra)
    else:
        final_extra.unlink(missing_ok=True)
    os.replace(staged, final)


def export_encoder(
    model: CLIP,
    kind: str,
    prefix: str | os.PathLike,
    precisions: Sequence[str] = ("fp32", "fp16"),
    context_length: int = 52,
    external_data: bool | None = None,
    check: bool = True,
    opset: int = EXPORT_OPSET,
) -> ExportResult:
    """Export one encoder in each of ``precisions``, check parity, then move the files next to ``prefix``.

    Nothing is written at the final paths unless every requested variant passes its parity threshold.
    """
    model = model.float().eval()
    final_dir = Path(f"{prefix}.x").parent
    result = ExportResult(paths={}, reports=[])
    with _staging_dir(final_dir) as stage:
        raw_dir = stage / "raw"
        raw_dir.mkdir()
        raw = raw_dir / "model.onnx"  # the exporter may scatter >2 GB weights beside it: keep them in their own dir
        torch_export(model, kind, raw, context_length, opset)
        fp32 = unshare_initializers(load_model(raw))
        source = stage / onnx_path(Path(prefix).name, kind, "fp32").name
        save_model(fp32, source, external_data)
        del fp32
        staged: dict[str, Path] = {}
        for precision in precisions:
            path = stage / onnx_path(Path(prefix).name, kind, precision).name
            if precision == "fp16":
                save_model(to_fp16(source), path, external_data)
            elif precision == "int8":
                save_model(quantize_int8(source), path, external_data)
            elif precision != "fp32":
                raise ConfigError(f"unknown ONNX precision {precision!r}; use fp32, fp16 or int8")
            staged[precision] = path
        if check:
            for precision, path in staged.items():
                report = check_parity(model, kind, path, precision, context_length)
                _logger.info("%s", report)
                result.reports.append(report)
            failed = [r for r in result.reports if not r.ok]
            if failed:
                raise ParityError("; ".join(str(r) for r in failed) + " (nothing written)")
        for precision, path in staged.items():
            final = onnx_path(prefix, kind, precision)
            _publish(path, final)
            result.paths[precision] = final
    return result
