"""Checkpoints in the reference layout (compatibility.md#checkpoint-format, #checkpoints-resume), written atomically,
plus exact-resume extras.

File content: ``{"epoch", "step", "name", "state_dict" ("module."-prefixed reference keys), "optimizer"}`` — what
the reference writes and reads — plus extra keys the reference ignores: ``"cn_clip"`` holding the exact data
position (epoch index and micro-batches consumed), the global step, the seed and the loss scaler; and, for a model
trained with ``--loss siglip``, ``"logit_bias"`` (:func:`export_reference` writes a file without the extras).
RNG state needs no saving: the trainer reseeds from ``(seed, step, rank)`` at every step.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any

from cn_clip.errors import CheckpointError
from cn_clip.fileio import atomic_torch_save
from cn_clip.models.clip_model import LOGIT_BIAS_KEY

_logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^epoch_(\d+)_(\d+)\.pt$")
_EPOCH_FILE = re.compile(r"^epoch(\d+)\.pt$")


@dataclasses.dataclass
class Position:
    """Where training stands: ``epoch`` (0-based) and ``batch`` = micro-batches of it already consumed."""

    epoch: int = 0
    batch: int = 0
    step: int = 0  # optimizer steps done in total


def build_checkpoint(
    name: str,
    state_dict: dict,
    optimizer: dict | None,
    position: Position,
    epoch_done: bool,
    seed: int,
    scaler: dict | None = None,
    lora: dict | None = None,
) -> dict[str, Any]:
    """``epoch`` is the reference's ``epoch + 1`` (also mid-epoch) and ``step`` the steps done."""
    state_dict, bias = split_logit_bias(state_dict)
    ckpt: dict[str, Any] = {"epoch": position.epoch + 1, "step": position.step, "name": name, "state_dict": state_dict}
    if bias is not None:
        ckpt[LOGIT_BIAS_KEY] = bias
    if optimizer is not None:
        ckpt["optimizer"] = optimizer
    ckpt["cn_clip"] = {
        "version": FORMAT_VERSION,
        "epoch_index": position.epoch,
        "batch_in_epoch": position.batch,
        "epoch_done": epoch_done,
        "global_step": position.step,
        "seed": seed,
        "scaler": scaler,
    }
    if lora is not None:  # config, unmerged base of the adapted weights, adapters (training/lora.py)
        ckpt["cn_clip"]["lora"] = lora
    return ckpt


def split_logit_bias(state_dict: dict) -> tuple[dict, Any]:
    """``(reference keys only, the SigLIP bias or None)``: the bias never enters ``state_dict`` (the reference's
    strict loader would reject it)."""
    names = [k for k in state_dict if k in (LOGIT_BIAS_KEY, f"module.{LOGIT_BIAS_KEY}")]
    if not names:
        return state_dict, None
    rest = {k: v for k, v in state_dict.items() if k not in names}
    return rest, state_dict[names[0]].detach().cpu().reshape(())


def export_reference(source: str | Path, target: str | Path) -> dict[str, Any]:
    """Write ``source`` as a file the reference loads: ``epoch``/``step``/``name``/``state_dict`` only. cn_clip's
    extras (exact-resume position, optimizer, a SigLIP ``logit_bias``) are dropped, the bias with a log note."""
    from cn_clip.weights import read_checkpoint, state_dict_of

    raw = read_checkpoint(source)
    state, bias = split_logit_bias(state_dict_of(raw, str(source)))
    if LOGIT_BIAS_KEY in raw:
        bias = raw[LOGIT_BIAS_KEY]
    out: dict[str, Any] = {k: raw[k] for k in ("epoch", "step", "name") if k in raw}
    out["state_dict"] = state
    if bias is not None:
        _logger.info(
            "%s: dropping the SigLIP logit_bias (%.4f): the reference has no such parameter; its scores stay cosine × "
            "logit_scale (keep the original file, or a calib.json, for match probabilities)",
            source,
            float(bias),
        )
    dropped = sorted(k for k in raw if k not in out and k != LOGIT_BIAS_KEY)
    if dropped:
        _logger.info("%s: not exported (cn_clip-only): %s", source, ", ".join(dropped))
    atomic_torch_save(out, Path(target))
    return out


def save(ckpt: dict[str, Any], path: Path) -> None:
    start = time.time()
    atomic_torch_save(ckpt, path)
    _logger.info(
        "Saved checkpoint %s (epoch %d @ %d steps) (writing took %s seconds)",
        path,
        ckpt["epoch"],
        ckpt["step"],
        time.time() - start,
    )


def prune(checkpoint_dir: Path, keep_last_k: int) -> list[Path]:
    """Keep the newest ``keep_last_k`` numbered checkpoints (``epochN.pt``, ``epoch_E_S.pt``); never
    ``epoch_latest.pt``. Returns what was deleted."""
    if keep_last_k <= 0 or not checkpoint_dir.is_dir():
        return []
    numbered = []
    for path in checkpoint_dir.iterdir():
        if m := _STEP_FILE.match(path.name):
            numbered.append(((int(m.group(1)), int(m.group(2)), 1), path))
        elif m := _EPOCH_FILE.match(path.name):
            numbered.append(((int(m.group(1)), 1 << 62, 0), path))
    numbered.sort()
    doomed = [path for _, path in numbered[:-keep_last_k]]
    for path in doomed:
        path.unlink(missing_ok=True)
        path.with_suffix(".lora.safetensors").unlink(missing_ok=True)  # a LoRA run's adapter file
        _logger.info("Removed old checkpoint %s (--keep-last-k %d)", path, keep_last_k)
    return doomed


def resume_position(ckpt: dict[str, Any], num_batches: int, accum_freq: int) -> Position:
    """Where to continue. cn_clip files: the exact next micro-batch. Reference files (no ``cn_clip`` key): the
    reference's rule, i.e. the start of epoch ``ckpt["epoch"]`` with the step recomputed from it
    (compatibility.md#fix-resume-position)."""
    extra = ckpt.get("cn_clip")
    if isinstance(extra, dict) and "epoch_index" in extra:
        epoch, batch = int(extra["epoch_index"]), int(extra["batch_in_epoch"])
        if extra.get("epoch_done") or batch >= num_batches:
            epoch, batch = epoch + 1, 0
        return Position(epoch, batch, int(extra["global_step"]))
    try:
        epoch = int(ckpt["epoch"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError("checkpoint has no integer 'epoch' (use --reset-data-offset)") from None
    return Position(epoch, 0, (num_batches // accum_freq) * epoch)
