"""Run by test_distributed.py (plain or under torchrun): one loss + backward on fixed inputs; rank 0 saves
the loss (mean over ranks) and the gradients after DDP's averaging. Usage: ddp_probe.py OUT [loss flags...]"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.helpers import fixture_model


def main() -> None:
    from cn_clip.runtime import all_reduce_sum, cleanup, init_distributed
    from cn_clip.training.engine import Engine
    from cn_clip.training.loss import ClipLoss, SigLipLoss
    from cn_clip.training.optim import create_optimizer, param_groups

    out, flags = Path(sys.argv[1]), set(sys.argv[2:])
    env = init_distributed()
    model = fixture_model()  # eval mode: no dropout, so one process and two agree
    siglip = "--siglip" in flags
    if siglip:
        model.init_siglip()  # the bias is used outside forward: DDP must still average its gradient
    engine = Engine(model, create_optimizer(param_groups(model, 0.2), 1e-3, (0.9, 0.98), 1e-6), env, "fp32")
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(8, 3, 64, 64, generator=gen)
    texts = torch.zeros(8, 12, dtype=torch.long)
    texts[:, 0], texts[:, 1:10], texts[:, 10] = 101, torch.randint(700, 8000, (8, 9), generator=gen), 102
    per_rank = 8 // env.world_size
    rows = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
    loss_fn = (SigLipLoss if siglip else ClipLoss)(
        env.rank, env.world_size, gather_with_grad="--gather-with-grad" in flags, local_loss="--local-loss" in flags
    )
    image, text, scale = engine.forward(images[rows], texts[rows])
    loss, _ = loss_fn(image, text, scale, bias=model.logit_bias)
    engine.backward(loss)
    mean_loss = all_reduce_sum(loss.detach().clone(), env) / env.world_size
    if env.is_primary:
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": mean_loss, "grads": grads, "world": env.world_size}, out)
    cleanup(env)


if __name__ == "__main__":
    main()
