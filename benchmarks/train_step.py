"""Training-step benchmark: cn_clip's trainer step against the reference's, same machine, same run.

One optimizer step = forward + symmetric InfoNCE + backward + AdamW (reference decay groups, lr 5e-5, wd 0.001) +
logit-scale clamp, fp32 on CPU (``--device cuda`` for a GPU, where peak memory is CUDA's). Random weights, random
normalised images, random texts (mean 18 tokens, padded to 52). Each configuration runs in its own process:
1 warm-up step, then ``--steps`` timed steps (median reported). "act MiB" is the peak memory above the level after
the warm-up step (weights and Adam state), i.e. the activations plus, for cn_clip, the gradients (our step frees
them, the reference keeps them until its next ``zero_grad``, so compare "peak MiB" across implementations and
"act MiB" across cn_clip variants). Large tensors are mmapped so RSS follows live memory. The reference (cn-clip
1.6.0) runs in its own venv with ``.cuda()`` patched to identity; it has no FLIP for RN50 and no local loss.
The LoRA variants (``lora``, ``lora-ckpt``: r = 16 on both towers' attention, only the adapters train) also report
trainable parameters and the optimizer (Adam) state after the warm-up step, against full fine-tuning (``base``).

    .venv/bin/python benchmarks/train_step.py [--archs ViT-B-16 RN50] [--batches 8] [--steps 2]
        [--variants ref base flip ckpt local lora lora-ckpt] [--ref-python .refvenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import reference  # benchmarks/reference.py: where the reference venv is

REPO = Path(__file__).resolve().parents[1]
ARCHS = {"ViT-B-16": "ViT-B-16@RoBERTa-wwm-ext-base-chinese", "RN50": "RN50@RBT3-chinese"}
VARIANTS = {
    "ref": "reference cn-clip 1.6.0",
    "base": "cn_clip",
    "flip": "cn_clip --mask-ratio 0.5",
    "ckpt": "cn_clip --grad-checkpointing",
    "local": "cn_clip --local-loss --gather-with-grad",
    "lora": "cn_clip --lora-r 16",
    "lora-ckpt": "cn_clip --lora-r 16 --grad-checkpointing",
}
LORA_R = 16  # the LoRA variants: r = alpha = 16 on both towers' attention (docs/adaptation.md)


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _inputs(batch: int, resolution: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution, generator=gen)
    texts = torch.zeros(batch, 52, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(10, 27, (1,), generator=gen))
        texts[i, 0], texts[i, 1 : n + 1], texts[i, n + 1] = 101, torch.randint(700, 20000, (n,), generator=gen), 102
    return images, texts


def _measure(step, steps: int, device: str, optimizer=None) -> dict:
    import torch

    step()  # warm-up: allocates grads and Adam state
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mib()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    result = {"times": times, "act_mib": max(peak - base, 0.0), "peak_mib": peak, "loss": float(loss)}
    if optimizer is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        result["trainable"] = sum(p.numel() for p in params)
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        result["optim_mib"] = sum(t.numel() * t.element_size() for t in state) / 2**20
    return result


def worker_ours(arch: str, batch: int, variant: str, steps: int, device: str) -> dict:
    import torch

    from cn_clip.models.factory import create_model
    from cn_clip.runtime import DistEnv
    from cn_clip.training.engine import Engine
    from cn_clip.training.loss import ClipLoss
    from cn_clip.training.optim import create_optimizer, param_groups

    torch.manual_seed(0)
    model = create_model(ARCHS[arch], device=device).train()
    if variant.startswith("lora"):
        from cn_clip.training.config import LoraCfg
        from cn_clip.training.lora import attach

        attach(model, LoraCfg(r=LORA_R, alpha=float(LORA_R)), seed=0)
        model.to(device)
    if variant.endswith("ckpt"):
        model.set_grad_checkpointing(True)
    env = DistEnv(device=torch.device(device))
    engine = Engine(model, create_optimizer(param_groups(model, 0.001), 5e-5, (0.9, 0.98), 1e-6), env, "fp32")
    loss_fn = ClipLoss(local_loss=variant == "local", gather_with_grad=variant == "local")
    images, texts = (t.to(device) for t in _inputs(batch, model.cfg.vision.image_resolution))
    mask_ratio = 0.5 if variant == "flip" else 0.0

    def step():
        image, text, scale = engine.forward(images, texts, mask_ratio)
        loss, _ = loss_fn(image, text, scale)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    result = _measure(step, steps, device, engine.optimizer)
    result["total"] = sum(p.numel() for p in model.parameters())
    return result


REF_WORKER = r"""
import json, sys, torch
torch.Tensor.cuda = lambda self, *a, **k: self
sys.path.insert(0, sys.argv[1])
from train_step import _inputs, _measure
from types import SimpleNamespace
from cn_clip.clip.model import CLIP
from cn_clip.training.train import get_loss
cfg = json.loads(sys.argv[2]); info = {}
for tower in cfg["arch"].split("@"):
    info.update(json.loads(open(f"{cfg['configs']}/{tower}.json").read()))
if isinstance(info["vision_layers"], str):
    info["vision_layers"] = json.loads(info["vision_layers"])
torch.manual_seed(0)
model = CLIP(**info).train()
exclude = lambda n: "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
named = [("module." + n, p) for n, p in model.named_parameters()]
opt = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n)], "weight_decay": 0.0},
                         {"params": [p for n, p in named if not exclude(n)], "weight_decay": 0.001}],
                        lr=5e-5, betas=(0.9, 0.98), eps=1e-6)
args = SimpleNamespace(accum_freq=1, mask_ratio=0, distillation=False, aggregate=False, local_device_rank=0,
                       report_training_batch_acc=False)
images, texts = _inputs(cfg["batch"], info["image_resolution"])
ce = torch.nn.CrossEntropyLoss()
def step():
    opt.zero_grad()
    loss, _ = get_loss(model, images, texts, ce, ce, args)
    loss.backward(); opt.step()
    model.logit_scale.data = torch.clamp(model.logit_scale.data, 0, 4.6052)
    return loss.detach()
print("RESULT " + json.dumps(_measure(step, cfg["steps"], "cpu")))
"""


def run_one(arch: str, batch: int, variant: str, steps: int, device: str, ref_python: str) -> dict:
    if variant == "ref":
        cfg = {"arch": ARCHS[arch], "batch": batch, "steps": steps, "configs": str(REPO / "cn_clip/models/configs")}
        cmd = [ref_python, "-P", "-c", REF_WORKER, str(Path(__file__).parent), json.dumps(cfg)]
    else:
        cmd = [sys.executable, __file__, "--worker", arch, str(batch), variant, str(steps), device]
    # large tensors via mmap: freed memory goes back to the OS, so RSS tracks live tensors (activations)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp" if variant == "ref" else REPO, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def machine() -> str:
    from cn_clip.deploy.benchmark import cpu_model

    cpu = cpu_model()
    return f"{cpu} | {os.cpu_count()} cores | torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["ViT-B-16"], choices=list(ARCHS))
    parser.add_argument("--batches", nargs="+", type=int, default=[8])
    parser.add_argument("--variants", nargs="+", default=["ref", "base", "flip", "ckpt"], choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ref-python", default=reference.REF_PYTHON)
    args = parser.parse_args()
    print(f"# train_step on {machine()}, device {args.device}, fp32, {args.steps} timed steps after 1 warm-up")
    print("| model | batch | variant | s/step (median) | samples/s | act MiB | peak MiB | trainable | Adam state MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        for batch in args.batches:
            for variant in args.variants:
                if variant == "flip" and arch.startswith("RN"):
                    continue  # FLIP is ViT-only
                if variant == "ref" and args.device != "cpu":
                    continue
                res = run_one(arch, batch, variant, args.steps, args.device, args.ref_python)
                if "error" in res:
                    print(f"| {arch} | {batch} | {VARIANTS[variant]} | error: {res['error']} |||||")
                    continue
                med = statistics.median(res["times"])
                trainable = (
                    f"{res['trainable'] / 1e6:.2f} M ({100 * res['trainable'] / res['total']:.2f} %)"
                    if "trainable" in res
                    else "all"
                )
                optim = f"{res['optim_mib']:.0f}" if "optim_mib" in res else "-"
                print(
                    f"| {arch} | {batch} | {VARIANTS[variant]} | {med:.2f} | {batch / med:.2f} | "
                    f"{res['act_mib']:.0f} | {res['peak_mib']:.0f} | {trainable} | {optim} |",
                    flush=True,
                )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        arch_, batch_, variant_, steps_, device_ = sys.argv[2:7]
        print("RESULT " + json.dumps(worker_ours(arch_, int(batch_), variant_, int(steps_), device_)))
    else:
        main()
