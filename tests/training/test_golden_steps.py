"""Two optimizer steps of our trainer equal the reference's (loss, AdamW groups, schedule, clamp, accumulation)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cn_clip.runtime import DistEnv
from cn_clip.training.config import LossCfg, TrainCfg
from cn_clip.training.engine import Engine
from cn_clip.training.loop import Batch, Trainer
from cn_clip.training.optim import create_optimizer, param_groups
from cn_clip.training.schedule import lr_at
from tests.fixtures.fixture_weights import fixture_images
from tests.helpers import FIXTURES, fixture_model

GOLDEN = np.load(FIXTURES / "training" / "steps.npz")


@pytest.mark.parametrize("accum,batch", [(1, 6), (2, 3)])
def test_two_steps_match_reference(accum: int, batch: int) -> None:
    model = fixture_model()  # eval mode: no dropout, as in the generator
    optimizer = create_optimizer(param_groups(model, 0.2), 1e-3, (0.9, 0.98), 1e-6)
    engine = Engine(model, optimizer, DistEnv(), "fp32")
    cfg = TrainCfg(name="golden", max_steps=4, max_epochs=1, lr=1e-3, accum_freq=accum, seed=0, loss=LossCfg())
    trainer = Trainer(cfg, DistEnv(), engine, {"train": SimpleNamespace(num_batches=4)}, None)
    images, texts = fixture_images(64, 12), torch.from_numpy(GOLDEN["texts"])
    micro = [
        Batch(images[i : i + batch], texts[i : i + batch], torch.arange(i, i + batch), torch.arange(i, i + batch))
        for i in range(0, 12, batch)
    ]
    losses = []
    for step in range(2):
        lr = lr_at(step, 1e-3, 1, 4)
        assert lr == pytest.approx(GOLDEN[f"accum{accum}/lrs"][step], rel=1e-12)
        engine.set_lr(lr)
        loss, _ = trainer.train_step(micro[step * accum : (step + 1) * accum], step)
        losses.append(float(loss))
    np.testing.assert_allclose(losses, GOLDEN[f"accum{accum}/losses"], atol=1e-5)
    params = dict(model.named_parameters())
    for key in GOLDEN.files:
        if key.startswith(f"accum{accum}/param/"):
            name = key.split("/param/")[1]
            ours = params[name].detach()
            ours = ours[:4] if ours.ndim else ours
            np.testing.assert_allclose(ours.numpy(), GOLDEN[key], atol=1e-5, err_msg=name)
