"""LoRA on both towers, merged into the reference keys when saving; adapter-only safetensors files.

Text tower: ``peft`` adapters on BERT's ``query``/``key``/``value``/``attention.output.dense`` (``attn``) and
``intermediate.dense``/``output.dense`` (``mlp``). Image towers, which ``peft`` does not fit (the packed
``in_proj_weight`` needs one update per q, k and v, and the reference keys must not move): :class:`PackedLora` for
``in_proj_weight``, :class:`LoraLinear` for ``out_proj``, the MLP's ``c_fc``/``c_proj`` and RN50's attention pool
(``q_proj``/``k_proj``/``v_proj``/``c_proj``). Every adapted weight keeps its reference key, so a LoRA model's
state dict is the reference's plus adapter keys.

Canonical adapter names: ``<reference weight key>.lora_A`` ``[r, in]`` and ``.lora_B`` ``[out, r]``; for
``in_proj_weight`` they are stacked over q, k, v: ``[3, r, D]`` and ``[3, D, r]``. ``ΔW = B·A·alpha/r`` (row
blocks q, k, v for the packed weight).

Checkpoints (see docs/adaptation.md): ``state_dict`` holds the merged reference keys (loads anywhere a normal
checkpoint loads); ``cn_clip.lora`` holds the config, the unmerged base values of the adapted weights and the
adapters, so a resume continues from exactly the same tensors. ``epochN.lora.safetensors`` beside each checkpoint
holds the adapters (plus the projections when they train) and the config as metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cn_clip.errors import CheckpointError, ConfigError
from cn_clip.training.config import LoraCfg

_logger = logging.getLogger(__name__)
ADAPTER_FORMAT = "cn_clip.lora/1"
TOWERS = ("text", "vision")
TARGETS = ("attn", "mlp")
_BERT_TARGETS = {
    "attn": r"attention\.self\.(query|key|value)|attention\.output\.dense",
    "mlp": r"intermediate\.dense|output\.dense",
}
_PEFT_BASE = re.compile(r"^(.*)\.base_layer\.(weight|bias)$")
_PEFT_AB = re.compile(r"^(.*)\.lora_([AB])\.default\.weight$")
_OWN_AB = re.compile(r"^(.*)\.lora_([AB])$")
_PACKED = ".in_proj_lora"


def _init_a(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # B starts at zero, so ΔW = 0 at step 0


class LoraLinear(nn.Module):
    """``nn.Linear`` plus ``B·A·scaling``; shares the base ``weight``/``bias`` so their keys stay as they were."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        _init_a(self.lora_A)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + low * self.scaling


class PackedLora(nn.Module):
    """The q, k and v row blocks of a packed ``in_proj_weight`` [3D, D], each with its own rank-r update."""

    def __init__(self, width: int, r: int, scaling: float, dropout: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(3, r, width, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(3, width, r, dtype=dtype))
        for block in self.lora_A:
            _init_a(block)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, L, D] → [B, L, 3D]
        three, r, width = self.lora_A.shape
        low = F.linear(self.dropout(x), self.lora_A.reshape(three * r, width))  # [B, L, 3r]
        low = low.unflatten(-1, (three, r))
        out = torch.einsum("blir,idr->blid", low, self.lora_B.to(low.dtype))  # [B, L, 3, D]
        return out.flatten(-2) * self.scaling


# ---- attaching ------------------------------------------------------------------------------------------------------
def _inject_text(bert: nn.Module, cfg: LoraCfg) -> None:
    from cn_clip.extras import require

    peft = require("peft", "LoRA on the text tower")
    LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model  # noqa: N806

    pattern = r"encoder\.layer\.\d+\.(" + "|".join(_BERT_TARGETS[t] for t in cfg.targets) + ")"
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern, bias="none")
    inject_adapter_in_model(peft_cfg, bert)


def _inject_vision(model: nn.Module, cfg: LoraCfg) -> None:
    visual = model.visual

    def wrap(parent: nn.Module, name: str) -> None:
        setattr(parent, name, LoraLinear(getattr(parent, name), cfg.r, cfg.scaling, cfg.dropout))

    if model.is_vit:
        for block in visual.transformer.resblocks:
            # A frozen MLP needs its hidden activations only to pass gradients back to earlier adapters: recomputing
            # them (one extra c_fc + GELU per block) is cheaper than storing 4x-wide tensors for every block.
            block.recompute_mlp = "mlp" not in cfg.targets
            if "attn" in cfg.targets:
                weight = block.attn.in_proj_weight
                block.attn.in_proj_lora = PackedLora(weight.shape[1], cfg.r, cfg.scaling, cfg.dropout, weight.dtype)
                wrap(block.attn, "out_proj")
            if "mlp" in cfg.targets:
                wrap(block.mlp, "c_fc")
                wrap(block.mlp, "c_proj")
        return
    if "attn" in cfg.targets:  # ModifiedResNet: the attention pool (c_proj is the projection)
        for name in ("q_proj", "k_proj", "v_proj") + (() if cfg.train_proj else ("c_proj",)):
            wrap(visual.attnpool, name)
    if "mlp" in cfg.targets:
        _logger.info("LoRA: the ResNet image tower has no MLP blocks; only its attention pool is adapted")


def projection_keys(state_keys: Sequence[str]) -> list[str]:
    """Reference keys of ``text_projection``, ``logit_scale`` and the image projection (``--lora-train-proj``)."""
    keys = set(state_keys)
    image = (
        ["visual.proj"] if "visual.proj" in keys else ["visual.attnpool.c_proj.weight", "visual.attnpool.c_proj.bias"]
    )
    return ["text_projection", "logit_scale", *image]


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Canonical adapter name → the model's parameter."""
    out = {}
    for name, param in model.named_parameters():
        canonical = _canonical_adapter(name)
        if canonical is not None:
            out[canonical] = param
    return out


def attach(model: nn.Module, cfg: LoraCfg, seed: int, resume: Mapping | None = None) -> None:
    """Add adapters to ``model`` (a plain CLIP with its weights loaded) and freeze everything else.

    ``resume`` is a LoRA checkpoint's ``cn_clip.lora`` entry: the base tensors and adapters are restored exactly.
    Adapters are initialised from ``seed`` alone, so every rank starts from the same values.
    """
    if resume is not None:
        _check_same_config(cfg, resume)
        with torch.no_grad():
            for key, value in resume["base"].items():
                model.get_parameter(key).copy_(value)
    with _seeded(seed):
        if "text" in cfg.towers:
            _inject_text(model.bert, cfg)
        if "vision" in cfg.towers:
            _inject_vision(model, cfg)
    model.requires_grad_(False)
    adapters = adapter_parameters(model)
    for param in adapters.values():
        param.requires_grad = True
    if cfg.train_proj:
        for key in projection_keys([name for name, _ in model.named_parameters()]):
            model.get_parameter(key).requires_grad = True
    if resume is not None:
        _load_adapters(adapters, resume["adapters"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    _logger.info(
        "LoRA r=%d alpha=%g on %s (%s): %d trainable of %d parameters (%.2f%%)",
        cfg.r, cfg.alpha, ",".join(cfg.towers), ",".join(cfg.targets), trainable, total, 100 * trainable / total,
    )  # fmt: skip


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_same_config(cfg: LoraCfg, resume: Mapping) -> None:
    saved = LoraCfg.from_dict(resume["config"])
    diff = [
        f"{k}: checkpoint {v!r}, flags {getattr(cfg, k)!r}" for k, v in saved.to_dict().items() if v != getattr(cfg, k)
    ]
    if diff:
        raise ConfigError("resuming a LoRA checkpoint with other LoRA settings (" + "; ".join(diff) + ")")


def _load_adapters(params: Mapping[str, nn.Parameter], saved: Mapping[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"LoRA adapters do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


# ---- merging --------------------------------------------------------------------------------------------------------
def _canonical_adapter(key: str) -> str | None:
    """``…query.lora_A.default.weight`` / ``…out_proj.lora_A`` / ``…attn.in_proj_lora.lora_A`` → canonical name."""
    if m := _PEFT_AB.match(key):
        return f"{m.group(1)}.weight.lora_{m.group(2)}"
    if m := _OWN_AB.match(key):
        owner = m.group(1)
        target = owner[: -len(_PACKED)] + ".in_proj_weight" if owner.endswith(_PACKED) else owner + ".weight"
        return f"{target}.lora_{m.group(2)}"
    return None


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``B·A·scaling`` in fp32; stacked (packed q/k/v) adapters give their row blocks concatenated."""
    a, b = lora_a.float(), lora_b.float()
    if a.dim() == 3:
        return torch.cat([b[i] @ a[i] for i in range(a.shape[0])]) * scaling
    return (b @ a) * scaling


def split_state(state: Mapping[str, torch.Tensor], cfg: LoraCfg) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA model's state dict (optionally ``module.``-prefixed) → ``(merged reference state, lora extra)``.

    The extra holds ``config``, ``base`` (unmerged values of the adapted weights) and ``adapters`` (canonical).
    """
    prefix = "module." if next(iter(state), "").startswith("module.") else ""
    plain: dict[str, torch.Tensor] = {}
    adapters: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        bare = key[len(prefix) :]
        if (canonical := _canonical_adapter(bare)) is not None:
            adapters[canonical] = value
        elif m := _PEFT_BASE.match(bare):
            plain[f"{prefix}{m.group(1)}.{m.group(2)}"] = value
        else:
            plain[key] = value
    merged, base = dict(plain), {}
    for target in sorted({name.rsplit(".", 1)[0] for name in adapters}):
        weight = plain[prefix + target]
        base[target] = weight
        delta = delta_weight(adapters[f"{target}.lora_A"], adapters[f"{target}.lora_B"], cfg.scaling)
        merged[prefix + target] = (weight.float() + delta).to(weight.dtype)
    return merged, {"config": cfg.to_dict(), "base": base, "adapters": adapters}


def adapter_tensors(merged: Mapping[str, torch.Tensor], extra: Mapping) -> dict[str, torch.Tensor]:
    """What the adapter file holds: the adapters, plus the trained projections (``--lora-train-proj``)."""
    tensors = {k: v.contiguous() for k, v in extra["adapters"].items()}
    if extra["config"].get("train_proj"):
        prefix = "module." if next(iter(merged), "").startswith("module.") else ""
        bare = [k[len(prefix) :] for k in merged]
        tensors.update({key: merged[prefix + key].contiguous() for key in projection_keys(bare)})
    return tensors


def save_adapter(path: Path, merged: Mapping[str, torch.Tensor], extra: Mapping) -> None:
    """``path`` (safetensors, written atomically): adapters + config metadata."""
    from safetensors.torch import save

    from cn_clip.fileio import atomic_write

    metadata = {"format": ADAPTER_FORMAT, "lora": json.dumps(extra["config"])}
    data = save(adapter_tensors(merged, extra), metadata=metadata)
    with atomic_write(path, "wb", encoding=None) as handle:
        handle.write(data)


def adapter_path(checkpoint: Path) -> Path:
    """``epoch3.pt`` → ``epoch3.lora.safetensors``."""
    return checkpoint.with_suffix(".lora.safetensors")


def read_adapter(path: str | Path) -> tuple[LoraCfg, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors adapter file ({exc})") from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: not a cn_clip LoRA adapter (metadata format {metadata.get('format')!r})")
    return LoraCfg.from_dict(json.loads(metadata["lora"])), tensors


def apply_adapter(
    state: Mapping[str, torch.Tensor], cfg: LoraCfg, tensors: Mapping[str, torch.Tensor], scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Base reference state (optionally ``module.``-prefixed) + ``scale``·ΔW; plain tensors in the file replace the
    base's. Every key must exist with the same shape."""
    prefix = "module." if next(iter(state), "").startswith("module.") else ""
    out = dict(state)
    problems = []
    for key, value in tensors.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if prefix + key not in out or out[prefix + key].shape != value.shape:
            problems.append(key)
        else:
            out[prefix + key] = value.to(out[prefix + key].dtype)
    for target in sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".lora_A", ".lora_B"))}):
        delta = delta_weight(tensors[f"{target}.lora_A"], tensors[f"{target}.lora_B"], cfg.scaling * scale)
        base = out.get(prefix + target)
        if base is None or base.shape != delta.shape:
            problems.append(target)
            continue
        out[prefix + target] = (base.float() + delta).to(base.dtype)
    if problems:
        raise CheckpointError(
            f"adapter does not fit the base weights (missing or other shape): {', '.join(problems[:5])}"
        )
    return out


# ---- command line -----------------------------------------------------------------------------------------------
def merge_checkpoint(checkpoint: str | Path, out: str | Path) -> None:
    """A LoRA run's ``epoch*.pt`` → a plain reference checkpoint (merged weights; no optimizer, no LoRA extras)."""
    from cn_clip.fileio import atomic_torch_save
    from cn_clip.weights import read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    if not isinstance((ckpt.get("cn_clip") or {}).get("lora"), dict):
        raise CheckpointError(f"{checkpoint}: not a LoRA training checkpoint (no cn_clip.lora entry)")
    plain = {key: ckpt.get(key) for key in ("epoch", "step", "name")}  # state_dict is already merged
    atomic_torch_save({**plain, "state_dict": ckpt["state_dict"]}, out)


def apply_checkpoint(base: str, adapter: str | Path, out: str | Path, scale: float = 1.0) -> None:
    """Base weights (a released name or a checkpoint file) + an adapter file → a reference checkpoint."""
    from cn_clip.fileio import atomic_torch_save
    from cn_clip.weights import read_checkpoint, state_dict_of

    path = Path(base)
    if not path.is_file():
        from cn_clip.models.factory import _released_file
        from cn_clip.models.pretrained import PRETRAINED

        if base not in PRETRAINED:
            raise CheckpointError(f"--base {base}: neither a checkpoint file nor a released model name")
        path = _released_file(base, None, False)
    ckpt = read_checkpoint(path)
    state = state_dict_of(ckpt, str(path))
    if not next(iter(state), "").startswith("module."):
        state = {"module." + k: v for k, v in state.items()}
    cfg, tensors = read_adapter(adapter)
    merged = apply_adapter(state, cfg, tensors, scale)
    atomic_torch_save({"epoch": ckpt.get("epoch", 0), "step": ckpt.get("step", 0), "name": Path(out).stem,
                       "state_dict": merged}, out)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cn_clip.training.lora", description="LoRA checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="LoRA run checkpoint → plain reference checkpoint (no optimizer/extras)")
    merge.add_argument("checkpoint", help="epoch*.pt written by a --lora-r run")
    merge.add_argument("--out", required=True, help="output .pt")
    apply = sub.add_parser("apply", help="base weights + adapter .safetensors → reference checkpoint")
    apply.add_argument("--base", required=True, help="released model name (e.g. ViT-B-16) or checkpoint file")
    apply.add_argument("--adapter", required=True, help="*.lora.safetensors written beside a LoRA run's checkpoint")
    apply.add_argument("--out", required=True, help="output .pt")
    apply.add_argument("--scale", type=float, default=1.0, help="multiply ΔW (0 = base, 1 = fine-tuned)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "merge":
        merge_checkpoint(args.checkpoint, args.out)
    else:
        apply_checkpoint(args.base, args.adapter, args.out, args.scale)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from cn_clip.cli.runner import run_cli

    sys.exit(run_cli(main))
