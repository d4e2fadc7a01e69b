"""SigLIP: the pairwise sigmoid loss, its distributed modes, the bias in checkpoints, and the reference export."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cn_clip.training.loss import SigLipLoss
from tests.helpers import FIXTURES, REF_PYTHON, fixture_model, needs_reference
from tests.helpers import TINY_ARCH as TINY
from tests.training.helpers import tiny_args, train

B, WORLD, D = 3, 2, 8


def _features(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, D, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, D, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    return image, text


def _direct(image, text, scale, bias, skip=frozenset()) -> torch.Tensor:
    """The paper's formula, one pair at a time: −1/|B| Σ_i Σ_j log σ(z_ij (t·x_i·y_j + b))."""
    total = 0.0
    for i in range(len(image)):
        for j in range(len(text)):
            if (i, j) in skip:
                continue
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (scale * image[i] @ text[j] + bias))
    return total / len(image)


def test_equals_direct_formula() -> None:
    image, text = _features(6)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64)
    loss, acc = SigLipLoss()(image, text, scale, bias=bias)
    assert float(loss.detach()) == pytest.approx(float(_direct(image, text, scale, bias).detach()), abs=1e-6)
    assert set(acc) == {"i2t", "t2i"}


def test_paper_initialisation() -> None:
    model = fixture_model()
    assert not model.has_logit_bias
    model.init_siglip()
    assert float(model.logit_scale.exp()) == pytest.approx(10.0)
    assert float(model.logit_bias) == -10.0
    assert "logit_bias" in dict(model.named_parameters())


def test_duplicate_pairs_are_not_negatives() -> None:
    image, text = _features(6)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    img_keys = torch.tensor([0, 0, 1, 2, 3, 4])  # pairs 0 and 1 share an image
    txt_keys = torch.tensor([5, 6, 7, 8, 9, 9])  # pairs 4 and 5 share a text
    masked = SigLipLoss(mask_duplicates=True)(image, text, scale, img_keys, txt_keys, bias=bias)[0]
    want = _direct(image, text, scale, bias, skip={(0, 1), (1, 0), (4, 5), (5, 4)})
    assert float(masked) == pytest.approx(float(want), abs=1e-6)
    plain = SigLipLoss(mask_duplicates=False)(image, text, scale, img_keys, txt_keys, bias=bias)[0]
    assert float(plain) == pytest.approx(float(_direct(image, text, scale, bias)), abs=1e-6)


def _rank_losses(image, text, scale, bias, **kw) -> list[torch.Tensor]:
    """Each fake rank's loss; the collectives hand over the other ranks' blocks (without grad unless asked)."""
    losses = []
    for rank in range(WORLD):
        blocks = {"img": list(image.split(B)), "txt": list(text.split(B))}

        def gather(local, with_grad, blocks=blocks):
            for name in ("img", "txt"):  # which rank-local block this is (also when detached)
                if any(local.data_ptr() == b.data_ptr() for b in blocks[name]):
                    return [b if with_grad else b.detach() for b in blocks[name]]
            raise AssertionError("unexpected gather")

        loss_fn = SigLipLoss(rank=rank, world_size=WORLD, gather=gather, **kw)
        losses.append(loss_fn(blocks["img"][rank], blocks["txt"][rank], scale, bias=bias)[0])
    return losses


@pytest.mark.parametrize(
    "kw,feature_grad",
    [({}, 1 / WORLD), ({"gather_with_grad": True}, 1.0), ({"gather_with_grad": True, "local_loss": True}, 1.0)],
    ids=["plain", "grad", "local"],
)
def test_ranks_equal_the_whole_batch(kw: dict, feature_grad: float) -> None:
    image, text = _features(B * WORLD, seed=1)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    full = SigLipLoss()(image, text, scale, bias=bias)[0]
    want = torch.autograd.grad(full, (image, text, scale, bias))
    mean = sum(_rank_losses(image, text, scale, bias, **kw)) / WORLD  # DDP averages the gradients
    assert float(mean) == pytest.approx(float(full), abs=1e-6)
    got = torch.autograd.grad(mean, (image, text, scale, bias))
    for g, w, factor in zip(got, want, (feature_grad, feature_grad, 1.0, 1.0), strict=True):
        torch.testing.assert_close(g, w * factor, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- training
def test_training_saves_the_bias_outside_the_state_dict(tmp_path: Path) -> None:
    from cn_clip.models.factory import load_from_name
    from cn_clip.weights import read_checkpoint

    summary = train(tiny_args(tmp_path, "--loss", "siglip", "--accum-freq", "2", steps=2))
    assert all(math.isfinite(x) for x in summary["losses"])
    path = tmp_path / "run" / "checkpoints" / "epoch_latest.pt"
    ckpt = read_checkpoint(path)
    assert not any("logit_bias" in k for k in ckpt["state_dict"])
    bias = float(ckpt["logit_bias"])
    assert bias != -10.0  # it was trained
    model, _ = load_from_name(
        str(path), device="cpu", vision_model_name="ViT-Tiny", text_model_name="BERT-Tiny-chinese"
    )
    assert float(model.logit_bias) == bias
    images, texts = torch.randn(2, 3, 64, 64), torch.tensor([[101, 800, 102], [101, 900, 102]])
    with torch.no_grad():
        probs = model.match_probability(images, texts)
        img, txt, scale = model(images, texts)
    torch.testing.assert_close(probs, torch.sigmoid(scale * img @ txt.t() + bias))
    # resuming keeps the trained bias; --loss clip drops it
    resumed = train(
        tiny_args(tmp_path / "r", "--loss", "siglip", "--resume", str(path), "--reset-data-offset", steps=1)
    )
    assert resumed["losses"]
    log = next((tmp_path / "r" / "run").glob("out_*.log")).read_text()
    assert "paper's initialisation" not in log
    assert "logit_bias" in read_checkpoint(tmp_path / "r" / "run" / "checkpoints" / "epoch_latest.pt")
    clip_run = train(
        tiny_args(tmp_path / "c", "--resume", str(path), "--reset-data-offset", "--reset-optimizer", steps=1)
    )
    assert clip_run["losses"]
    assert "logit_bias" not in read_checkpoint(tmp_path / "c" / "run" / "checkpoints" / "epoch_latest.pt")


def _siglip_checkpoint(path: Path) -> float:
    """A SigLIP-format file with the fixture weights (exact in fp16, as the reference loads them)."""
    from cn_clip.training.checkpoint import Position, build_checkpoint

    model = fixture_model()
    model.set_logit_bias(-4.25)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    ckpt = build_checkpoint("siglip", state, {"state": {}, "param_groups": []}, Position(0, 4, 4), False, 1)
    torch.save(ckpt, path)
    return -4.25


def test_reference_export_drops_the_bias_with_a_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cn_clip import convert
    from cn_clip.models.factory import load_from_name
    from cn_clip.weights import read_checkpoint

    _siglip_checkpoint(tmp_path / "siglip.pt")
    with caplog.at_level(logging.INFO):
        assert convert.convert(["to-reference", str(tmp_path / "siglip.pt"), str(tmp_path / "ref.pt")]) == 0
    assert "dropping the SigLIP logit_bias (-4.2500)" in caplog.text
    exported = read_checkpoint(tmp_path / "ref.pt")
    assert sorted(exported) == ["epoch", "name", "state_dict", "step"]
    model, _ = load_from_name(
        str(tmp_path / "ref.pt"), device="cpu", vision_model_name="ViT-Tiny", text_model_name="BERT-Tiny-chinese"
    )
    assert not model.has_logit_bias


@pytest.mark.slow
@needs_reference
def test_reference_loads_the_exported_siglip_checkpoint(tmp_path: Path) -> None:
    import subprocess

    import numpy as np

    from cn_clip import convert

    _siglip_checkpoint(tmp_path / "siglip.pt")
    assert convert.main(["to-reference", str(tmp_path / "siglip.pt"), str(tmp_path / "ref.pt")]) == 0
    out = tmp_path / "ref_features.npz"
    script = FIXTURES / "ref_load_exported.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the reference, not this tree, is cn_clip
    cmd = [str(REF_PYTHON), str(script), str(tmp_path / "ref.pt"), TINY, str(out)]
    subprocess.run(cmd, check=True, timeout=300, env=env, cwd=tmp_path)
    ref = np.load(out)
    model = fixture_model()
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(ref["images"]))
        text = model.encode_text(torch.from_numpy(ref["text_ids"]))
    np.testing.assert_allclose(image.numpy(), ref["image_features"], atol=1e-5)
    np.testing.assert_allclose(text.numpy(), ref["text_features"], atol=1e-5)


def test_flat_state_dict_of_a_siglip_model_loads() -> None:
    from cn_clip.models.factory import create_model

    model = fixture_model()
    model.set_logit_bias(-2.5)
    loaded = create_model(TINY, checkpoint=model.state_dict())
    assert float(loaded.logit_bias) == -2.5
