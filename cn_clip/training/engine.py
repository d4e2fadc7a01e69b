"""One interface over the three ways a step runs: a plain module, DDP, or a DeepSpeed engine (ZeRO 0–3).

The loop only calls ``forward``/``autocast``/``backward``/``step``/``no_sync`` and never branches on the back end.

Precision (compatibility.md#optimizer-schedule, #fix-fp16-training): ``fp32`` plain; ``amp`` and ``fp16`` keep fp32
master weights, autocast fp16 and use
dynamic loss scaling on an accelerator (the reference's pure-fp16 training, with no master weights, collapses);
``bf16`` autocasts to bfloat16 (no scaler). On a CPU ``amp``/``fp16`` fall back to fp32 (logged). With DeepSpeed
the precision comes from its config (``--precision bf16`` turns ``bf16.enabled`` on).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cn_clip.errors import ConfigError
from cn_clip.models.clip_model import LOGIT_SCALE_MAX
from cn_clip.runtime import DistEnv, autocast_dtype

_logger = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        env: DistEnv,
        precision: str = "fp32",
        grad_clip_norm: float | None = None,
        static_graph: bool = False,
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.env = env
        self.precision = precision
        self.grad_clip_norm = grad_clip_norm
        self.dtype = autocast_dtype(precision, env.device)
        if precision in ("amp", "fp16") and self.dtype is None:
            _logger.info("--precision %s needs an accelerator; training in fp32 on CPU", precision)
        self.scaler = torch.amp.GradScaler(env.device.type) if self.dtype == torch.float16 else None
        self.model: nn.Module = module
        if env.distributed and env.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = DistributedDataParallel(module, device_ids=device_ids)
            if static_graph:
                self.model._set_static_graph()

    @property
    def is_deepspeed(self) -> bool:
        return False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce for the backward passes inside (all but the last micro-batch)."""
        if skip and hasattr(self.model, "no_sync"):
            with self.model.no_sync():
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        if self.scaler:
            if self.grad_clip_norm:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.module.clamp_logit_scale()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # --layer-decay

    @property
    def lr(self) -> float:
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def logit_scale(self) -> float:
        return float(self.module.logit_scale.detach().float())

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Reference key names with the DDP prefix ``module.``, on CPU."""
        return {f"module.{k}": v.detach().cpu() for k, v in self.module.state_dict().items()}

    def optimizer_state_dict(self) -> dict | None:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def scaler_state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler else None

    def load_scaler_state_dict(self, state: dict | None) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)

    def save_extra(self, checkpoint_dir: Path, tag: str) -> None:
        """Back-end state that does not fit the reference layout (DeepSpeed's partitioned optimizer)."""

    def load_extra(self, checkpoint_dir: Path, tag: str) -> bool:
        return False


def resolve_deepspeed_config(
    path: str | None, batch_size: int, accum_freq: int, world_size: int, precision: str, grad_clip_norm: float | None
) -> dict:
    """Read a DeepSpeed JSON and fill the fields the trainer owns (batch sizes, precision, clipping)."""
    config: dict = {}
    if path:
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"--deepspeed_config {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--deepspeed_config {path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    for key in ("optimizer", "scheduler"):
        if config.pop(key, None) is not None:
            _logger.warning("DeepSpeed config %s: the %r section is ignored (the trainer owns it)", path, key)
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = accum_freq
    config["train_batch_size"] = batch_size * accum_freq * world_size
    config["zero_allow_untested_optimizer"] = True
    if grad_clip_norm:
        config["gradient_clipping"] = grad_clip_norm
    if precision == "bf16":
        config["bf16"] = {**config.get("bf16", {}), "enabled": True}
        config.pop("fp16", None)
    elif precision == "fp32":
        config.get("bf16", {})["enabled"] = False
        config.get("fp16", {})["enabled"] = False
    return config


class DeepSpeedEngine(Engine):
    """DeepSpeed back end. Accumulation is DeepSpeed's: ``step`` after every micro-batch applies the optimizer at the
    boundary; feature-caching losses are summed, not averaged (``scale_wrt_gas=False``), as in DDP."""

    def __init__(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, config: dict, precision: str
    ) -> None:
        from cn_clip.extras import require

        deepspeed = require("deepspeed", "--deepspeed")

        self.module = module
        self.env = env
        self.precision = precision
        self.grad_clip_norm = None
        self.scaler = None
        self.dtype = None
        self.ds_config = config
        # DeepSpeed (0.19) broadcasts/partitions parameters through ``p.data.view(torch.uint8)``, which fails for
        # 0-dim tensors (``logit_scale``): such parameters live as shape [1] inside the engine and are saved as [].
        self.scalar_names = [name for name, p in module.named_parameters() if p.dim() == 0]
        for name in self.scalar_names:
            param = module.get_parameter(name)
            param.data = param.data.reshape(1)
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.base_optimizer = optimizer
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        self.accum = int(config["gradient_accumulation_steps"])

    @property
    def is_deepspeed(self) -> bool:
        return True

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed casts the module itself

    def forward(self, image: torch.Tensor, text: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dtype = next(self.model.module.parameters()).dtype
        return self.model(image.to(dtype), text, *args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)
        self.model.step()

    def step(self) -> None:
        self._clamp_logit_scale()

    def _clamp_logit_scale(self) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        param = self.module.logit_scale
        master = safe_get_full_fp32_param(param) if self.zero_stage > 0 or self.precision != "fp32" else None
        if master is not None and not 0 <= float(master) <= LOGIT_SCALE_MAX:
            safe_set_full_fp32_param(param, master.clamp(0, LOGIT_SCALE_MAX))
        if self.zero_stage < 3:
            self.module.clamp_logit_scale()

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes gradients at the accumulation boundary

    def set_lr(self, lr: float) -> None:
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def logit_scale(self) -> float:
        """The working copy (no collective: only rank 0 logs it); under ZeRO-3 the local shard may be empty."""
        value = self.module.logit_scale.detach()
        return float(value.float()) if value.numel() == 1 else float("nan")

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights in the reference layout (gathered from the ZeRO-3 partitions when needed)."""
        if self.zero_stage == 3:
            from cn_clip.extras import require

            deepspeed = require("deepspeed", "--deepspeed")

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                state = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        else:
            state = {
                k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in self.module.state_dict().items()
            }
        for name in self.scalar_names:
            state[name] = state[name].reshape(())
        return {f"module.{k}": v for k, v in state.items()}

    def optimizer_state_dict(self) -> dict | None:
        return None  # partitioned: saved by save_extra in DeepSpeed's own format

    def load_optimizer_state_dict(self, state: dict) -> None:
        _logger.warning("DeepSpeed: optimizer state in a reference-layout file is not loaded (use its ds/ dir)")

    def save_extra(self, checkpoint_dir: Path, tag: str) -> None:
        self.model.save_checkpoint(str(checkpoint_dir / "deepspeed"), tag=tag, save_latest=True)

    def load_extra(self, checkpoint_dir: Path, tag: str) -> bool:
        ds_dir = checkpoint_dir / "deepspeed"
        if not (ds_dir / tag).is_dir():
            return False
        self.model.load_checkpoint(str(ds_dir), tag=tag, load_module_strict=True)
        return True
