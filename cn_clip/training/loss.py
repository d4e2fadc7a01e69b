"""Contrastive losses over features gathered from all ranks: InfoNCE (the reference's), SigLIP's pairwise sigmoid
loss, their nested-dimension (Matryoshka) form, and the distillation loss (compatibility.md#loss, #distillation).

Collectives are injected (``gather``), so a test can fake several ranks inside one process.

Modes, for B local and N = B·world global samples:
- default: the reference. Features are all-gathered without autograd, the local block first, and every rank builds
  the full [N, N] logits; gradients flow through the local features only.
- ``gather_with_grad``: an autograd all-gather in rank order (gradients reach every rank's features).
- ``local_loss``: each rank keeps only its own rows ([B, N] logits, labels offset by its position). With
  ``gather_with_grad`` the mean over ranks equals the full loss, and so do the averaged gradients, in O(B·N) memory.
- ``aggregate=False`` (``--skip-aggregate``): local [B, B] logits only.
- ``mask_duplicates``: a pair whose image id or text id equals that of the row's own pair is not a negative (its
  logit is set to −inf), except the row's own label. The reference treats such pairs as negatives
  (compatibility.md#fix-in-batch-validation, #fix-padding-duplicates).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GatherFn = Callable[[torch.Tensor, bool], list[torch.Tensor]]


def dist_gather(tensor: torch.Tensor, with_grad: bool) -> list[torch.Tensor]:
    """All ranks' tensors in rank order via ``torch.distributed`` (autograd-aware when ``with_grad``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [tensor]
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        return list(dist_fn.all_gather(tensor.contiguous()))
    out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


class ClipLoss:
    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        aggregate: bool = True,
        gather_with_grad: bool = False,
        local_loss: bool = False,
        mask_duplicates: bool = False,
        gather: GatherFn = dist_gather,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.aggregate = aggregate and world_size > 1
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss
        self.mask_duplicates = mask_duplicates
        self.gather = gather

    def gather_all(
        self, local: torch.Tensor, with_grad: bool | None = None, rank_order: bool | None = None
    ) -> tuple[torch.Tensor, int]:
        """``(all [N, …], offset of the local block)``: local first, or in rank order when ``rank_order`` (default:
        when gathering with grad, whose gathered tensors are the other ranks' own)."""
        if not self.aggregate:
            return local, 0
        with_grad = self.gather_with_grad if with_grad is None else with_grad
        parts = self.gather(local, with_grad)
        if with_grad if rank_order is None else rank_order:
            return torch.cat(parts, dim=0), self.rank * local.shape[0]
        others = [p for r, p in enumerate(parts) if r != self.rank]
        return torch.cat([local, *others], dim=0), 0

    def logits(
        self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(logits_per_image, logits_per_text, labels, offset)`` with the rows this rank is responsible for."""
        all_image, offset = self.gather_all(image)
        all_text, _ = self.gather_all(text)
        batch = image.shape[0]
        if self.local_loss and self.aggregate:
            per_image = scale * image @ all_text.t()  # [B, N]
            per_text = scale * text @ all_image.t()  # [B, N]
            labels = torch.arange(batch, device=image.device) + offset
        else:
            per_image = scale * all_image @ all_text.t()  # [N, N]
            per_text = per_image.t()
            labels = torch.arange(per_image.shape[0], device=image.device)
            offset = 0
        return per_image, per_text, labels, offset

    def gather_keys(self, local: torch.Tensor) -> torch.Tensor:
        """Ids gathered without grad, in the same order as the features."""
        return self.gather_all(local, with_grad=False, rank_order=self.gather_with_grad)[0]

    def duplicate_mask(self, image_keys: torch.Tensor, text_keys: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[rows, N] bool: True where a column shares the row pair's image or text id (the label excluded)."""
        all_img, all_txt = self.gather_keys(image_keys), self.gather_keys(text_keys)
        row_img, row_txt = all_img[labels], all_txt[labels]
        dup = (row_img[:, None] == all_img[None, :]) | (row_txt[:, None] == all_txt[None, :])
        dup[torch.arange(labels.shape[0], device=dup.device), labels] = False
        return dup

    def __call__(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        image_keys: torch.Tensor | None = None,
        text_keys: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Symmetric cross-entropy ``(CE(per_image) + CE(per_text)) / 2`` and the in-batch top-1 accuracies.
        ``bias`` is accepted for a common interface and unused: a shift of every logit leaves a softmax unchanged."""
        per_image, per_text, labels, _ = self.logits(image, text, scale)
        if self.mask_duplicates and image_keys is not None and text_keys is not None:
            dup = self.duplicate_mask(image_keys, text_keys, labels)
            if bool(dup.any()):
                per_image = per_image.masked_fill(dup, float("-inf"))
                per_text = per_text.masked_fill(dup, float("-inf"))
        loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
        with torch.no_grad():
            acc = {
                "i2t": (per_image.argmax(-1) == labels).float().mean(),
                "t2i": (per_text.argmax(-1) == labels).float().mean(),
            }
        return loss, acc


class SigLipLoss(ClipLoss):
    """Pairwise sigmoid loss (SigLIP): ``−1/R · Σ_rows Σ_j log σ(z_ij · (scale · img_i·txt_j + bias))`` with
    ``z = +1`` for a row's own pair and −1 otherwise, over the R image rows this rank is responsible for.

    Same modes as :class:`ClipLoss`. With ``local_loss`` each rank scores its B images against all N texts ([B, N]
    logits, O(B·N) memory); with ``gather_with_grad`` too, the mean over ranks is the loss of the whole batch and the
    averaged gradients are its gradients. Without ``local_loss`` every rank scores all [N, N] pairs.
    ``mask_duplicates`` drops the terms of pairs sharing the row pair's image or text id (they are matches, not
    negatives); the normaliser stays R.
    """

    def __call__(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        image_keys: torch.Tensor | None = None,
        text_keys: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if bias is None:
            raise ValueError("SigLipLoss needs the model's logit_bias")
        all_text, offset = self.gather_all(text)
        if self.local_loss and self.aggregate:
            rows = image
            labels = torch.arange(image.shape[0], device=image.device) + offset
        else:
            rows, _ = self.gather_all(image)
            labels = torch.arange(rows.shape[0], device=image.device)
        logits = scale * rows @ all_text.t() + bias  # [R, N]
        sign = torch.full_like(logits, -1.0)
        sign[torch.arange(labels.shape[0], device=logits.device), labels] = 1.0
        terms = -F.logsigmoid(sign * logits)
        if self.mask_duplicates and image_keys is not None and text_keys is not None:
            terms = terms.masked_fill(self.duplicate_mask(image_keys, text_keys, labels), 0.0)
        loss = terms.sum() / logits.shape[0]
        with torch.no_grad():
            acc = {"i2t": (logits.argmax(-1) == labels).float().mean(), "t2i": self._text_accuracy(image, text)}
        return loss, acc

    def _text_accuracy(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """In-batch text→image top-1 over all N images (gathered without grad)."""
        all_image, offset = self.gather_all(image.detach(), with_grad=False)
        labels = torch.arange(text.shape[0], device=text.device) + offset
        return ((text.detach() @ all_image.t()).argmax(-1) == labels).float().mean()


class MatryoshkaLoss:
    """Nested-dimension contrastive loss (``--matryoshka-dims``): the mean of ``base`` over the leading ``k``
    coordinates of both features, re-normalised, for each ``k`` in ``dims``. Same call interface as ``base``
    (:class:`ClipLoss` or :class:`SigLipLoss`); with one ``k`` equal to the full width it equals ``base``.
    Accuracies are those of the largest ``k``."""

    def __init__(self, base: ClipLoss, dims: tuple[int, ...]) -> None:
        self.base = base
        self.dims = tuple(sorted(dims, reverse=True))

    def __getattr__(self, name: str):  # gather helpers etc. (the distillation term gathers through the loss)
        if name == "base":  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def __call__(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        image_keys: torch.Tensor | None = None,
        text_keys: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from cn_clip.models.matryoshka import truncate

        total, first_acc = None, {}
        for dim in self.dims:
            img, txt = (image, text) if dim == image.shape[-1] else (truncate(image, dim), truncate(text, dim))
            loss, acc = self.base(img, txt, scale, image_keys, text_keys, bias=bias)
            total = loss if total is None else total + loss
            first_acc = first_acc or acc
        return total / len(self.dims), first_acc


def kd_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``1 − mean cos(teacher, student resized)``: the student [N, D_s], seen as a 1×1×N×D_s image, is resized
    bilinearly (``align_corners=False``) to the teacher's [N_t, D_t] (the reference's formula)."""
    resized = F.interpolate(student[None, None], size=tuple(teacher.shape), mode="bilinear", align_corners=False)
    return 1 - F.cosine_similarity(teacher, resized[0, 0], dim=1).mean()
