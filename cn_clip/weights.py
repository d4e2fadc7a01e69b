"""Safe checkpoint reading and strict, explained state-dict loading.

Accepts the reference's files (``{"state_dict": {"module.…": …}, "epoch", "step", …}``), flat state dicts, keys with
or without ``module.``, with or without ``bert.pooler.*`` and in the flash-attention layout; ``.safetensors`` too;
open_clip's checkpoints (see :mod:`cn_clip.models.clip_layouts`).
Pickles are read with ``weights_only=True``: a file that tries to run code is refused.
"""

from __future__ import annotations

import logging
import math
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cn_clip.errors import CheckpointError

_logger = logging.getLogger(__name__)
DDP_PREFIX = "module."
_MAX_LISTED = 8


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file without executing code. Returns the raw object (a dict).

    Zip-format ``.pt`` files (everything ``torch.save`` writes since PyTorch 1.6) and ``.safetensors`` are
    memory-mapped: tensors are read from the page cache when used, not copied up front.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path))}
        except Exception as exc:  # safetensors raises several types for a corrupt header
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle (only tensors and plain containers are allowed): {exc}"
        ) from exc
    except Exception as exc:  # garbage bytes reach the unpickler's internals: IndexError, KeyError, struct.error, …
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return dict(obj)


_NUMERIC_KINDS = "biufc"  # bool, int, uint, float, complex: no object, void, string or datetime dtypes


def _numeric_dtype(spec: Any, align: bool = False, copy: bool = False) -> Any:
    """``numpy.dtype(spec)`` for a short numeric type code only (what NumPy pickles a dtype as)."""
    import numpy as np

    if not isinstance(spec, str) or len(spec) > 4 or np.dtype(spec).kind not in _NUMERIC_KINDS:
        raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) is not a plain numeric dtype")
    del copy  # always a fresh dtype: the unpickler then sets its state, which must not touch NumPy's shared ones
    return np.dtype(spec, align=bool(align), copy=True)


def _numeric_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy scalar(dtype, bytes)`` for numeric dtypes only: the LR the reference's cosine schedule stores."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
        raise pickle.UnpicklingError(f"NumPy scalar of dtype {dtype!r} is not a plain numeric scalar")
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"NumPy {dtype} scalar needs {dtype.itemsize} bytes of data")
    return np.frombuffer(data, dtype=dtype)[0].copy()


def _numpy_scalar_globals() -> list[tuple[Any, str]]:
    """The NumPy globals of a reference training checkpoint (its optimizer's ``lr`` is a ``numpy.float64``), each
    behind a check that admits numeric scalars and dtypes only; nothing here can run code or build objects.

    NumPy 2 writes ``numpy._core.multiarray.scalar``, NumPy 1 ``numpy.core.multiarray.scalar``; both write
    ``numpy.dtype``. The dtype classes are listed because the unpickler sets a dtype's state only for allowed types.
    """
    import numpy as np

    dtype_classes = [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"]
    return [
        (_numeric_scalar, "numpy._core.multiarray.scalar"),
        (_numeric_scalar, "numpy.core.multiarray.scalar"),
        (_numeric_dtype, "numpy.dtype"),
        *[(cls, f"numpy.dtypes.{cls.__name__}") for cls in dtype_classes],
    ]


def state_dict_of(checkpoint: Mapping[str, Any], source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: ``checkpoint["state_dict"]`` if present, else the flat dict itself."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: non-tensor entries {bad[:_MAX_LISTED]} (is this a training checkpoint?)")
    return dict(state)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = DDP_PREFIX) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that has it (any key, not only when the first one does)."""
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def from_flash_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the reference's flash-attention keys (``Wqkv``, ``self.out_proj``) to the standard layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".attn.Wqkv." in key:
            out[key.replace(".attn.Wqkv.", ".attn.in_proj_")] = value
        elif ".attention.self.Wqkv." in key:
            stem, kind = key.rsplit(".Wqkv.", 1)
            for name, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"{stem}.{name}.{kind}"] = chunk
        elif ".attention.self.out_proj." in key:
            out[key.replace(".attention.self.out_proj.", ".attention.output.dense.")] = value
        else:
            out[key] = value
    return out


def to_flash_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_flash_layout` (kept for ``convert_state_dict`` compatibility)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".attn.in_proj_" in key:
            out[key.replace(".attn.in_proj_", ".attn.Wqkv.")] = value
        elif ".attention.self.query." in key:
            stem, kind = key.rsplit(".query.", 1)
            parts = [state[f"{stem}.{name}.{kind}"] for name in ("query", "key", "value")]
            out[f"{stem}.Wqkv.{kind}"] = torch.cat(parts, dim=0)
        elif ".attention.self.key." in key or ".attention.self.value." in key:
            continue
        elif ".attention.output.dense." in key:
            out[key.replace(".attention.output.dense.", ".attention.self.out_proj.")] = value
        else:
            out[key] = value
    return out


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference API: flip between the standard and the flash-attention layout, keeping any ``module.`` prefix."""
    is_flash = any(".Wqkv." in k for k in state)
    return from_flash_layout(state) if is_flash else to_flash_layout(state)


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Standard layout, no ``module.`` prefix, no pooler (released files never had one; our model has none)."""
    state = from_flash_layout(strip_prefix(state))
    # position_ids / token_type_ids: buffers that older transformers saved and current ones do not
    return {
        k: v
        for k, v in state.items()
        if not k.startswith("bert.pooler.") and not k.endswith(("position_ids", ".embeddings.token_type_ids"))
    }


def resize_pos_embed(
    state: dict[str, torch.Tensor],
    model: torch.nn.Module,
    key: str = "visual.positional_embedding",
    mode: str = "bicubic",
):
    """Interpolate a ViT's stored position grid to the model's grid (``mode``, ``align_corners=True``), in place."""
    stored = state.get(key)
    target = dict(model.state_dict()).get(key)
    if stored is None or target is None or stored.shape == target.shape or stored.dim() != 2:
        return
    old_grid, new_grid = math.isqrt(stored.shape[0] - 1), math.isqrt(target.shape[0] - 1)
    if old_grid**2 + 1 != stored.shape[0] or new_grid**2 + 1 != target.shape[0] or stored.shape[1] != target.shape[1]:
        return  # not a square grid; the strict loader reports the mismatch
    _logger.info("Resizing position embedding grid-size from %s to %s", (old_grid, old_grid), (new_grid, new_grid))
    grid = stored[1:].float().reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode=mode, align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(stored.dtype)
    state[key] = torch.cat([stored[:1], grid], dim=0)


def key_differences(
    first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """``(only in first, only in second, in both with different shapes)``; each in its own mapping's key order (the
    shape list in ``first``'s)."""
    only_first = [k for k in first if k not in second]
    only_second = [k for k in second if k not in first]
    reshaped = [k for k, v in first.items() if k in second and second[k].shape != v.shape]
    return only_first, only_second, reshaped


def listed_keys(keys: Sequence[str]) -> str:
    """At most eight keys, then how many more: the key lists of every state-dict error message."""
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" … (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def load_state_dict_strict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """Copy ``state`` into ``model``; any missing, unexpected or mis-shaped key is an error that names it.

    ``assign=True`` (for a model built on the meta device) makes the checkpoint's tensors the model's, cast to the
    model's dtype (fp16 files load as fp32) instead of copying them into freshly initialised ones.
    """
    state = clean_state_dict(state)
    expected = model.state_dict()
    from cn_clip.models.clip_layouts import from_plain_open_clip, is_plain_open_clip

    if is_plain_open_clip(state):  # open_clip's plain CLIP: its text transformer becomes a CLIPTextModel tower
        state = from_plain_open_clip(state, any(k.startswith("text.transformer.text_model.") for k in expected))
    resize_pos_embed(state, model)
    missing, unexpected, reshaped = key_differences(expected, state)
    mismatched = [f"{k} {list(state[k].shape)} vs model {list(expected[k].shape)}" for k in reshaped]
    problems = []
    if missing:
        problems.append(f"missing keys: {listed_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listed_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {listed_keys(mismatched)}")
    if problems:
        name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
        raise CheckpointError(f"{source} does not fit {name}: " + "; ".join(problems))
    if assign:
        state = {k: state[k].to(v.dtype).contiguous() for k, v in expected.items()}
    model.load_state_dict(state, strict=True, assign=assign)
