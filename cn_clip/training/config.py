"""Typed settings of the training loop, built once from the command line by ``training/params.py``.

The loop below the entry point reads these, never an argparse ``Namespace``; ``DataCfg`` (``data/loader.py``) is
its counterpart for the data layer.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LossCfg:
    """The contrastive loss (``loss.ClipLoss`` or ``loss.SigLipLoss``) and the distillation term's weight."""

    kind: str = "clip"  # --loss: clip (InfoNCE, the reference's) or siglip (pairwise sigmoid)
    aggregate: bool = True  # all-gather features across ranks (off: --skip-aggregate)
    gather_with_grad: bool = False  # autograd through the all-gather
    local_loss: bool = False  # only this rank's rows against all columns
    mask_duplicates: bool = True  # pairs sharing an image or text id are not negatives
    kd_loss_weight: float = 0.5  # weight of the distillation loss (used with a teacher)
    matryoshka_dims: tuple[int, ...] = ()  # nested-dimension losses (--matryoshka-dims); () = the plain loss


@dataclasses.dataclass(frozen=True)
class LoraCfg:
    """Low-rank adapters (``training/lora.py``): ``ΔW = B·A·alpha/r`` on the chosen towers' target layers."""

    r: int
    alpha: float  # scaling numerator; --lora-alpha, default r (scaling 1)
    dropout: float = 0.0  # dropout on the adapter's input
    towers: tuple[str, ...] = ("text", "vision")
    targets: tuple[str, ...] = ("attn",)  # "attn" and/or "mlp"
    train_proj: bool = False  # also train text_projection, the image projection and logit_scale

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoraCfg:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class TrainCfg:
    """What ``loop.Trainer`` reads: schedule, step seeding, logging cadence and checkpoint naming.

    ``max_steps`` and ``max_epochs`` are resolved (see :func:`cn_clip.training.loop.resolve_max_steps`).
    """

    name: str  # experiment name, stored in checkpoints
    max_steps: int
    max_epochs: int
    lr: float
    warmup: int = 500  # linear warm-up steps
    skip_scheduler: bool = False  # constant LR
    accum_freq: int = 1  # micro-batches per optimizer step (feature caching)
    seed: int = 123  # seeds dropout, FLIP masks and the sampler
    mask_ratio: float = 0.0  # FLIP: fraction of patches dropped
    loss: LossCfg = dataclasses.field(default_factory=LossCfg)
    freeze_vision: bool = False  # frozen towers stay in eval mode
    freeze_text: bool = False
    use_flash_attention: bool = False  # validation under the training autocast
    log_interval: int = 10  # log every N steps
    report_training_batch_acc: bool = False
    valid_step_interval: int | None = None  # validate every N steps; None/0 = off
    save_step_frequency: int = -1  # write epoch_E_S.pt every N steps; <= 0 = off
    keep_last_k: int = 0  # keep the newest K epoch*.pt; 0 = all
    lora: LoraCfg | None = None  # checkpoints merge the adapters into the reference keys
