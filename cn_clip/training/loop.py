"""The training epoch and the validation pass. Never branches on the model family or the back end."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cn_clip.fileio import atomic_write
from cn_clip.runtime import DistEnv, all_gather_list, all_reduce_sum
from cn_clip.training import checkpoint as ckpt_io
from cn_clip.training.config import TrainCfg
from cn_clip.training.engine import Engine
from cn_clip.training.loss import ClipLoss, MatryoshkaLoss, SigLipLoss, kd_loss
from cn_clip.training.schedule import lr_at

if TYPE_CHECKING:
    from cn_clip.eval.featio import Features

_logger = logging.getLogger(__name__)
_MIX = 0x9E3779B97F4A7C15


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby steps/ranks get unrelated streams."""
    value = 0
    for part in parts:
        value = (value ^ (int(part) + _MIX + (value << 6) + (value >> 2))) & ((1 << 64) - 1)
        value = (value * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    return value >> 1


@dataclasses.dataclass
class Batch:
    images: torch.Tensor
    texts: torch.Tensor
    image_keys: torch.Tensor
    text_keys: torch.Tensor


class Trainer:
    def __init__(
        self,
        cfg: TrainCfg,
        env: DistEnv,
        engine: Engine,
        data: dict,
        checkpoint_dir: Path | None,
        teacher: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None,
        writer: Any = None,
        retention: Any = None,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.engine = engine
        self.data = data
        self.checkpoint_dir = checkpoint_dir
        self.teacher = teacher
        self.writer = writer
        self.retention = retention  # training.retention.RetentionMonitor
        self.retention_history: list[dict[str, float]] = []
        self.kd_losses: list[torch.Tensor] = []  # distillation term per optimizer step, detached
        self.siglip = cfg.loss.kind == "siglip"
        self.loss_fn = (SigLipLoss if self.siglip else ClipLoss)(
            rank=env.rank,
            world_size=env.world_size,
            aggregate=cfg.loss.aggregate,
            gather_with_grad=cfg.loss.gather_with_grad,
            local_loss=cfg.loss.local_loss,
            mask_duplicates=cfg.loss.mask_duplicates,
        )
        if cfg.loss.matryoshka_dims:
            self.loss_fn = MatryoshkaLoss(self.loss_fn, cfg.loss.matryoshka_dims)
        self.accum = cfg.accum_freq
        self.num_batches = data["train"].num_batches
        self.steps_per_epoch = self.num_batches // self.accum
        self.last_loss: float | None = None
        self.losses: list[torch.Tensor] = []  # per optimizer step, detached (no device sync in the loop)

    # ---- one optimizer step -------------------------------------------------------------------------------------
    def _to_device(self, raw: Any) -> Batch:
        images, texts, _eos, image_keys, text_keys = raw
        dev = self.env.device
        return Batch(images.to(dev), texts.to(dev), image_keys.to(dev), text_keys.to(dev))

    def _mask_generator(self, step: int, micro: int) -> torch.Generator | None:
        if not self.cfg.mask_ratio:
            return None
        gen = torch.Generator(device=self.env.device)
        gen.manual_seed(mix_seed(self.cfg.seed, step, micro, self.env.rank, 0xF11F))
        return gen

    def _features(self, batch: Batch, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, text, scale = self.engine.forward(
            batch.images, batch.texts, self.cfg.mask_ratio, self._mask_generator(step, micro)
        )
        return image, text, scale.mean()

    def _loss(
        self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, batches: list[Batch], teacher_feats: Any
    ) -> tuple[torch.Tensor, dict]:
        image_keys = torch.cat([b.image_keys for b in batches])
        text_keys = torch.cat([b.text_keys for b in batches])
        bias = self.engine.module.logit_bias if self.siglip else None
        loss, acc = self.loss_fn(image, text, scale, image_keys, text_keys, bias=bias)
        if teacher_feats:
            kd = sum(
                kd_loss(*self._kd_rows(teacher_feats[tower], {"image": image, "text": text}[tower]))
                for tower in teacher_feats
            )
            loss = loss + self.cfg.loss.kd_loss_weight * kd
            acc = {**acc, "kd": kd.detach()}
        return loss, acc

    def _kd_rows(self, teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher and student rows in the same order: all-gathered (local first) when the loss aggregates."""
        if self.loss_fn.aggregate:
            return self.loss_fn.gather_keys(teacher), self.loss_fn.gather_all(student)[0].float()
        return teacher, student.float()

    def _teacher_features(self, batches: list[Batch]) -> dict[str, torch.Tensor] | None:
        """Per distilled tower, the frozen teacher's features of the whole step's micro-batches."""
        if self.teacher is None:
            return None
        parts = [self.teacher(b.images, b.texts) for b in batches]
        return {tower: torch.cat([p[tower] for p in parts]) for tower in parts[0]}

    def train_step(self, batches: list[Batch], step: int) -> tuple[torch.Tensor, dict]:
        """One optimizer step over ``accum_freq`` micro-batches (feature caching when > 1,
        compatibility.md#accumulation)."""
        torch.manual_seed(mix_seed(self.cfg.seed, step, self.env.rank))  # dropout etc.: a function of the step
        engine = self.engine
        teacher_feats = self._teacher_features(batches)
        if self.accum == 1:
            with engine.autocast():
                image, text, scale = self._features(batches[0], step, 0)
                loss, acc = self._loss(image, text, scale, batches, teacher_feats)
            engine.backward(loss)
        else:
            with torch.no_grad(), engine.autocast():
                cached = [self._features(b, step, j)[:2] for j, b in enumerate(batches)]  # same mask as below
            for j, batch in enumerate(batches):
                with engine.no_sync(j < self.accum - 1):
                    with engine.autocast():
                        image_j, text_j, scale = self._features(batch, step, j)
                        image = torch.cat([c[0] for c in cached[:j]] + [image_j] + [c[0] for c in cached[j + 1 :]])
                        text = torch.cat([c[1] for c in cached[:j]] + [text_j] + [c[1] for c in cached[j + 1 :]])
                        loss, acc = self._loss(image, text, scale, batches, teacher_feats)
                    engine.backward(loss)
        engine.step()
        return loss.detach(), acc

    # ---- one epoch ----------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, start_batch: int = 0) -> int:
        """Train ``epoch`` from micro-batch ``start_batch``; returns the optimizer steps done."""
        cfg, info = self.cfg, self.data["train"]
        info.sampler.set_epoch(epoch)
        info.sampler.set_start(start_batch * info.batch_size)
        self.engine.module.train()
        self.freeze_modes()
        data_iter = iter(info.dataloader)
        steps_done, end = 0, time.time()
        progress = self._progress(self.steps_per_epoch - start_batch // self.accum)
        for i_accum in range(start_batch // self.accum, self.steps_per_epoch):
            step = self.steps_per_epoch * epoch + i_accum
            if step >= cfg.max_steps:
                _logger.info(
                    "Stopping training due to step %d has reached max_steps %d", step, cfg.max_steps // self.accum
                )
                break
            self.engine.set_lr(lr_at(step, cfg.lr, cfg.warmup, cfg.max_steps, cfg.skip_scheduler))
            batches = [self._to_device(next(data_iter)) for _ in range(self.accum)]
            data_time = time.time() - end
            loss, acc = self.train_step(batches, step)
            batch_time, end = time.time() - end, time.time()
            steps_done += 1
            self.losses.append(loss)
            if "kd" in acc:
                self.kd_losses.append(acc["kd"])
            position = ckpt_io.Position(epoch, (i_accum + 1) * self.accum, step + 1)
            if progress is not None:
                progress.update(1)
            if (step + 1) % cfg.log_interval == 0:
                self._log_train(epoch, i_accum, step, loss, acc, data_time, batch_time, len(batches[0].images))
            if self._step_validation_due(step):
                self.validate(epoch, step + 1)
                self.engine.module.train()
                self.freeze_modes()
            if cfg.save_step_frequency > 0 and (step + 1) % cfg.save_step_frequency == 0:
                self.save(position, epoch_done=False, names=[f"epoch_{epoch + 1}_{step + 1}.pt"])
        if progress is not None:
            progress.close()
        return steps_done

    def freeze_modes(self) -> None:
        """Frozen towers run in eval mode (BatchNorm statistics and dropout stay fixed)."""
        module = self.engine.module
        for layer in module.modules():  # frozen BatchNorms (LoRA, locked groups) keep their running statistics
            frozen = getattr(layer, "weight", None) is not None and not layer.weight.requires_grad
            if frozen and isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.eval()
        if self.cfg.freeze_vision:
            module.visual.eval()
        if self.cfg.freeze_text:
            module.text_tower.eval()

    def _progress(self, total: int) -> Any:
        if not (self.env.is_primary and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=total, leave=False, dynamic_ncols=True)

    def _step_validation_due(self, step: int) -> bool:
        interval = self.cfg.valid_step_interval
        return "val" in self.data and bool(interval) and interval > 0 and (step + 1) % interval == 0

    def _log_train(
        self, epoch: int, i_accum: int, step: int, loss: torch.Tensor, acc: dict, data_t: float, batch_t: float, b: int
    ) -> None:
        self.last_loss = float(loss)
        if not self.env.is_primary:
            return
        batch_size = b * self.accum
        num_samples = (i_accum + 1) * batch_size * self.env.world_size
        percent = 100.0 * (i_accum + 1) / self.steps_per_epoch
        parts = [
            f"Global Steps: {step + 1}/{self.cfg.max_steps}",
            f"Train Epoch: {epoch + 1} [{num_samples}/{self.data['train'].num_samples} ({percent:.0f}%)]",
            f"Loss: {float(loss):.6f}",
        ]
        if "kd" in acc:
            parts.append(f"Distill Loss: {float(acc['kd']):.6f}")
        if self.cfg.report_training_batch_acc:
            parts += [
                f"Image2Text Acc: {float(acc['i2t']) * 100:.2f}",
                f"Text2Image Acc: {float(acc['t2i']) * 100:.2f}",
            ]
        parts += [
            f"Data Time: {data_t:.3f}s",
            f"Batch Time: {batch_t:.3f}s",
            f"LR: {self.engine.lr:5f}",
            f"logit_scale: {self.engine.logit_scale():.3f}",
            f"Global Batch Size: {batch_size * self.env.world_size}",
        ]
        _logger.info(" | ".join(parts))
        if self.writer is not None:
            self.writer.add_scalar("train/loss", float(loss), step + 1)
            self.writer.add_scalar("train/lr", self.engine.lr, step + 1)
            self.writer.add_scalar("train/logit_scale", self.engine.logit_scale(), step + 1)

    # ---- validation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, epoch: int, steps: int) -> dict[str, float]:
        """The reference's in-batch loss/accuracy plus retrieval recall over the whole split
        (compatibility.md#fix-in-batch-validation)."""
        _logger.info("Begin to eval on validation set (epoch %d @ %d steps)...", epoch + 1, steps)
        info = self.data["val"]
        module = self.engine.module
        module.eval()
        info.sampler.set_epoch(0)
        dev = self.env.device
        sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss·B, i2t hits, t2i hits, count
        feats: list[tuple[torch.Tensor, ...]] = []
        batch_size = 0
        for i, raw in enumerate(info.dataloader):
            batch = self._to_device(raw)
            with self.engine.autocast() if self.cfg.use_flash_attention else torch.autocast(dev.type, enabled=False):
                image, text, scale = self.engine.forward(batch.images, batch.texts)
            image, text = image.float(), text.float()
            per_image = scale.mean().float() * image @ text.t()
            labels = torch.arange(len(image), device=dev)
            loss = (
                torch.nn.functional.cross_entropy(per_image, labels)
                + torch.nn.functional.cross_entropy(per_image.t(), labels)
            ) / 2
            batch_size = len(image)
            sums += torch.stack(
                [
                    loss.double() * batch_size,
                    (per_image.argmax(-1) == labels).sum().double(),
                    (per_image.t().argmax(-1) == labels).sum().double(),
                    torch.tensor(float(batch_size), dtype=torch.float64, device=dev),
                ]
            )
            feats.append((image, text, batch.image_keys, batch.text_keys))
            if (i + 1) % 100 == 0:
                _logger.info("Evaluated %d/%d batches...", i + 1, info.num_batches)
        all_reduce_sum(sums, self.env)
        loss, i2t, t2i, count = (float(x) for x in sums)
        if int(count) != info.num_samples:
            _logger.warning("validation saw %d samples, expected %d", int(count), info.num_samples)
        _logger.info(
            f"Validation Result (epoch {epoch + 1} @ {steps} steps) | Valid Loss: {loss / count:.6f} | "
            f"Image2Text Acc: {i2t / count * 100:.2f} | Text2Image Acc: {t2i / count * 100:.2f} | "
            f"logit_scale: {self.engine.logit_scale():.3f} | Valid Batch Size: {batch_size}"
        )
        recalls = self._retrieval(feats)
        metrics = {"loss": loss / count, "i2t_acc": i2t / count * 100, "t2i_acc": t2i / count * 100, **recalls}
        metrics.update(self.check_retention(steps))
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"val/{key}", value, steps)
        self.last_validation = metrics
        return metrics

    def check_retention(self, steps: int) -> dict[str, float]:
        """Zero-shot top-1 on ``--retention-data`` and its change since before training (logged; {} when off)."""
        if self.retention is None:
            return {}
        metrics = self.retention.check(self.engine.module, steps)
        self.retention_history.append({"steps": steps, **metrics})
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"retention/{key}", value, steps)
        return metrics

    def _retrieval(self, feats: list[tuple[torch.Tensor, ...]]) -> dict[str, float]:
        if not feats:
            return {}
        local = [torch.cat([f[k] for f in feats]) for k in range(4)]
        image, text, image_keys, text_keys = (torch.cat(all_gather_list(t, self.env)) for t in local)
        recalls = pair_recall(image, text, image_keys, text_keys)
        _logger.info(
            "Validation Retrieval (%d texts, %d images) | Text2Image R@1: %.2f | R@5: %.2f | R@10: %.2f | "
            "Image2Text R@1: %.2f | R@5: %.2f | R@10: %.2f | Mean Recall: %.2f",
            int(recalls.pop("num_texts")),
            int(recalls.pop("num_images")),
            *(recalls[k] for k in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean_recall")),
        )
        return recalls

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def save(self, position: ckpt_io.Position, epoch_done: bool, names: list[str]) -> None:
        """Write ``names`` (then ``epoch_latest.pt``) atomically on rank 0; DeepSpeed state on every rank."""
        if self.checkpoint_dir is None:
            return
        state = self.engine.model_state_dict()  # collective under ZeRO-3
        lora_extra = None
        if self.cfg.lora is not None:  # reference keys hold the merged weights; the extra keeps resume exact
            from cn_clip.training.lora import split_state

            state, lora_extra = split_state(state, self.cfg.lora)
        if self.engine.is_deepspeed:
            self.engine.save_extra(self.checkpoint_dir, "last")
        if not self.env.is_primary:
            return
        ckpt = ckpt_io.build_checkpoint(
            self.cfg.name,
            state,
            self.engine.optimizer_state_dict(),
            position,
            epoch_done,
            self.cfg.seed,
            self.engine.scaler_state_dict(),
            lora=lora_extra,
        )
        if self.retention is not None and self.retention.baseline is not None:  # a resumed run keeps its baseline
            ckpt["cn_clip"]["retention_baseline"] = {"data": str(self.retention.path), "top1": self.retention.baseline}
        first = self.checkpoint_dir / names[0]
        ckpt_io.save(ckpt, first)
        if lora_extra is not None:
            from cn_clip.training.lora import adapter_path, save_adapter

            for name in dict.fromkeys([*names, "epoch_latest.pt"]):
                save_adapter(adapter_path(self.checkpoint_dir / name), state, lora_extra)
        for name in [n for n in [*names[1:], "epoch_latest.pt"] if n != names[0]]:
            start = time.time()
            with atomic_write(self.checkpoint_dir / name, "wb") as out, first.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 24)
            _logger.info(
                "Saved checkpoint %s (epoch %d @ %d steps) (writing took %s seconds)",
                self.checkpoint_dir / name,
                ckpt["epoch"],
                ckpt["step"],
                time.time() - start,
            )
        ckpt_io.prune(self.checkpoint_dir, self.cfg.keep_last_k)


def pair_recall(
    image: torch.Tensor, text: torch.Tensor, image_keys: torch.Tensor, text_keys: torch.Tensor
) -> dict[str, float]:
    """Text→image and image→text R@1/5/10 (%) and their mean over the unique images/texts of a pair list, through
    the evaluation's ranking (:func:`cn_clip.eval.topk.evaluate_retrieval`).

    A query counts as found at k if any of its ground-truth items (pairs sharing its id) is in the top k.
    """
    from cn_clip.eval.topk import evaluate_retrieval

    truth: dict[int, list[int]] = {}
    for image_key, text_key in zip(image_keys.tolist(), text_keys.tolist(), strict=True):
        truth.setdefault(text_key, []).append(image_key)
    images, texts = _unique_rows(image, image_keys, "image_id"), _unique_rows(text, text_keys, "text_id")
    result = evaluate_retrieval(images, texts, truth)
    out: dict[str, float] = {"num_texts": len(texts), "num_images": len(images)}
    for short, name in (("t2i", "text_to_image"), ("i2t", "image_to_text")):
        out.update({f"{short}_r{k}": result[name][f"r{k}"] for k in (1, 5, 10)})
    out["mean_recall"] = sum(out[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)) / 6
    return out


def _unique_rows(features: torch.Tensor, keys: torch.Tensor, id_key: str) -> Features:
    """The first row of each key (pairs repeat an image for each of its texts), as evaluation features."""
    from cn_clip.eval.featio import Features

    first: dict[int, int] = {}
    for row, key in enumerate(keys.tolist()):
        first.setdefault(key, row)
    rows = torch.tensor(list(first.values()), dtype=torch.long, device=features.device)
    return Features(list(first), features[rows].float().cpu().numpy(), id_key)


def resolve_max_steps(max_steps: int | None, max_epochs: int, accum_freq: int, num_batches: int) -> tuple[int, int]:
    """``(max_steps, max_epochs)``: ``--max-steps`` wins and sets the epochs; otherwise steps follow from the epochs.

    The reference's rule, with ``num_batches`` micro-batches per rank and epoch.
    """
    if max_steps is not None:
        return max_steps, math.ceil(max_steps * accum_freq / num_batches)
    return (num_batches // accum_freq) * max_epochs, max_epochs
