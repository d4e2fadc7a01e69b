"""ClipLoss modes with faked collectives: local loss = full loss, gather orders, duplicate masking, KD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cn_clip.training.loss import ClipLoss, kd_loss

B, WORLD, D = 3, 2, 8


def _features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(B * WORLD, D, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(B * WORLD, D, generator=gen), dim=-1).requires_grad_()
    return image, text


def _fake_gather(blocks: list[torch.Tensor]):
    """All ranks' local tensors; the 'remote' ones lose their grad unless gathering with grad."""

    def gather(local: torch.Tensor, with_grad: bool) -> list[torch.Tensor]:
        return [b if with_grad else b.detach() for b in blocks]

    return gather


def _rank_loss(image, text, rank: int, **kw) -> torch.Tensor:
    img_blocks, txt_blocks = list(image.split(B)), list(text.split(B))
    blocks = {id(img_blocks[rank]): img_blocks, id(txt_blocks[rank]): txt_blocks}

    def gather(local: torch.Tensor, with_grad: bool) -> list[torch.Tensor]:
        src = blocks.get(id(local))
        if src is None:  # keys
            return list(torch.arange(B * WORLD).split(B))
        return _fake_gather(src)(local, with_grad)

    loss_fn = ClipLoss(rank=rank, world_size=WORLD, gather=gather, **kw)
    return loss_fn(img_blocks[rank], txt_blocks[rank], torch.tensor(10.0))[0]


def _full(image, text) -> torch.Tensor:
    return ClipLoss()(image, text, torch.tensor(10.0))[0]


@pytest.mark.parametrize(
    "kw",
    [{}, {"gather_with_grad": True}, {"gather_with_grad": True, "local_loss": True}],
    ids=["plain", "grad", "local"],
)
def test_modes_equal_full_loss_and_gradient(kw: dict) -> None:
    image, text = _features()
    full = _full(image, text)
    g_full = torch.autograd.grad(full, (image, text))
    losses = [_rank_loss(image, text, r, **kw) for r in range(WORLD)]
    mean = sum(losses) / WORLD
    assert float(mean.detach()) == pytest.approx(float(full.detach()), abs=1e-6)
    if not kw.get("local_loss"):
        for loss in losses:  # every rank sees the full loss
            assert float(loss.detach()) == pytest.approx(float(full.detach()), abs=1e-6)
    # DDP averages the per-rank gradients; with grad through the gather, that is the full gradient
    # (plain gather: each rank only reaches its own features, so the average is full / world)
    g_mean = torch.autograd.grad(mean, (image, text))
    scale = 1.0 if kw else 1.0 / WORLD
    for got, want in zip(g_mean, g_full, strict=True):
        torch.testing.assert_close(got, want * scale)


def test_skip_aggregate_is_local() -> None:
    image, text = _features()
    loss_fn = ClipLoss(rank=0, world_size=WORLD, aggregate=False)
    assert float(loss_fn(image[:B], text[:B], torch.tensor(10.0))[0]) == pytest.approx(
        float(_full(image[:B], text[:B])), abs=1e-7
    )


def test_duplicate_masking() -> None:
    image, text = _features()
    scale = torch.tensor(10.0)
    img_keys = torch.tensor([0, 0, 1, 2, 3, 4])  # pairs 0 and 1 share an image
    txt_keys = torch.tensor([5, 6, 7, 8, 9, 9])  # pairs 4 and 5 share a text
    masked = ClipLoss(mask_duplicates=True)(image, text, scale, img_keys, txt_keys)[0]
    logits = scale * image @ text.t()
    dup = torch.zeros(6, 6, dtype=torch.bool)
    dup[0, 1] = dup[1, 0] = dup[4, 5] = dup[5, 4] = True
    want = (
        F.cross_entropy(logits.masked_fill(dup, -math.inf), torch.arange(6))
        + F.cross_entropy(logits.t().masked_fill(dup, -math.inf), torch.arange(6))
    ) / 2
    assert float(masked) == pytest.approx(float(want), abs=1e-6)
    unmasked = ClipLoss(mask_duplicates=False)(image, text, scale, img_keys, txt_keys)[0]
    assert float(unmasked) == pytest.approx(float(_full(image, text)), abs=1e-7)
    assert float(masked) < float(unmasked)
    # no duplicates: identical to the reference loss
    unique = ClipLoss(mask_duplicates=True)(image, text, scale, torch.arange(6), torch.arange(6) + 10)[0]
    assert float(unique) == pytest.approx(float(unmasked), abs=1e-7)


def test_kd_loss_formula() -> None:
    teacher = torch.randn(4, 6)
    assert float(kd_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(4, 3)
    resized = F.interpolate(student[None, None], size=(4, 6), mode="bilinear", align_corners=False)[0, 0]
    want = 1 - F.cosine_similarity(teacher, resized, dim=1).mean()
    assert float(kd_loss(teacher, student)) == pytest.approx(float(want), abs=1e-7)


@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_keys_are_gathered_in_the_features_order(gather_with_grad: bool) -> None:
    """Duplicate masking compares ids column by column: rank 1's gathered ids follow its gathered features."""
    other = {"feat": torch.full((2, 3), 7.0), "keys": torch.tensor([70, 71])}

    def fake_gather(local: torch.Tensor, with_grad: bool) -> list[torch.Tensor]:
        theirs = other["keys"] if local.dtype == torch.long else other["feat"]
        return [theirs, local]  # rank 0's block, then ours (rank 1)

    loss = ClipLoss(rank=1, world_size=2, gather_with_grad=gather_with_grad, gather=fake_gather)
    features, offset = loss.gather_all(torch.ones(2, 3))
    keys = loss.gather_keys(torch.tensor([10, 11]))
    expected = [70, 71, 10, 11] if gather_with_grad else [10, 11, 70, 71]
    assert keys.tolist() == expected
    assert [int(row[0]) for row in features] == [7 if k >= 70 else 1 for k in expected]
    assert offset == (2 if gather_with_grad else 0)
