"""Multi-process runs (slow): torchrun with 2 gloo processes against one process with the doubled batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.training.helpers import latest_state, tiny_args

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("ddp_probe.py")
_PORT = iter(range(29650, 29700))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(next(_PORT)), *args]  # fmt: skip


def _probe(tmp_path: Path, nproc: int, flags: list[str]) -> dict:
    out = tmp_path / f"probe{nproc}.pt"
    cmd = (
        _torchrun(nproc, str(PROBE), str(out), *flags) if nproc > 1 else [sys.executable, str(PROBE), str(out), *flags]
    )
    subprocess.run(cmd, check=True, env=_env(), cwd=REPO, timeout=300)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize(
    "flags,grad_scale",
    [
        ([], 0.5),
        (["--gather-with-grad"], 1.0),
        (["--gather-with-grad", "--local-loss"], 1.0),
        (["--siglip"], 0.5),
        (["--siglip", "--gather-with-grad", "--local-loss"], 1.0),
    ],
    ids=["reference", "gather-with-grad", "local-loss", "siglip", "siglip-local-loss"],
)
def test_two_processes_equal_one_with_double_batch(tmp_path: Path, flags: list[str], grad_scale: float) -> None:
    single, double = _probe(tmp_path, 1, flags), _probe(tmp_path, 2, flags)
    assert double["world"] == 2
    assert float(double["loss"]) == pytest.approx(float(single["loss"]), abs=1e-5)
    # the reference's plain gather only reaches local features: DDP's average is the full gradient / world
    # (logit_scale enters every rank's full logits directly, so its gradient is complete)
    for name, grad in single["grads"].items():
        scale = 1.0 if name in ("logit_scale", "logit_bias") else grad_scale
        torch.testing.assert_close(double["grads"][name], grad * scale, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "extra,global_batch",
    [([], 8), (["--loss", "siglip", "--local-loss", "--gather-with-grad", "--accum-freq", "2"], 16)],
    ids=["clip", "siglip-accum"],
)
def test_torchrun_main_two_processes(tmp_path: Path, extra: list[str], global_batch: int) -> None:
    argv = tiny_args(tmp_path, "--save-step-frequency", "2", *extra, steps=3)
    cmd = _torchrun(2, "-m", "cn_clip.training.main", "--", *argv)
    subprocess.run(cmd, check=True, env=_env(), cwd=REPO, timeout=300)
    log = next((tmp_path / "run").glob("out_*.log")).read_text()
    assert f"Global Batch Size: {global_batch}" in log
    assert latest_state(tmp_path)["module.logit_scale"].shape == ()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "epoch_latest.pt", map_location="cpu", weights_only=True)
    assert ("logit_bias" in ckpt) == ("siglip" in extra)


LOCAL_PRIMARY_PROBE = """
import sys, time
from cn_clip.runtime import cleanup, init_distributed, local_primary_first
env = init_distributed(device="cpu")
with local_primary_first(env):
    with open(sys.argv[1], "a") as log:
        log.write(f"{env.rank} in\\n")
    time.sleep(1.0 if env.is_local_primary else 0.0)  # a download
    with open(sys.argv[1], "a") as log:
        log.write(f"{env.rank} out\\n")
cleanup(env)
"""


def test_local_primary_runs_first_while_the_others_wait(tmp_path: Path) -> None:
    script, log = tmp_path / "probe.py", tmp_path / "order.txt"
    script.write_text(LOCAL_PRIMARY_PROBE, encoding="utf-8")
    subprocess.run(_torchrun(2, str(script), str(log)), check=True, env=_env(), cwd=REPO, timeout=300)
    assert log.read_text().split("\n")[:4] == ["0 in", "0 out", "1 in", "1 out"]


SHARD_PROBE = """
import json, sys
from cn_clip.data.loader import DataCfg, SplitCfg, get_data
from cn_clip.runtime import cleanup, init_distributed
env = init_distributed(device="cpu")
info = get_data(DataCfg(SplitCfg(sys.argv[1], 3, 2), seed=5, shuffle_window=4), env.world_size, env.rank, 32)["train"]
epochs = {}
for epoch in (0, 1):
    info.dataset.set_epoch(epoch)
    epochs[epoch] = [key for batch in info.dataloader for key in batch[4].tolist()]
with open(f"{sys.argv[2]}.{env.rank}", "w") as out:
    json.dump({"world": env.world_size, "epochs": epochs}, out)
cleanup(env)
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 pairs (12 images, two captions each) in 5 shards, from the LMDB builder's output."""
    from cn_clip.data.lmdb_build import build_lmdb
    from cn_clip.data.wds_build import build_webdataset
    from tests.data.helpers import image_bytes, write_split

    root = tmp_path_factory.mktemp("shards")
    images = [(100 + i, image_bytes(i, "JPEG", size=(40, 32))) for i in range(12)]
    texts = [
        {"text_id": 2 * i + k, "text": f"第{i}张图片的说明{k}", "image_ids": [100 + i]}
        for i in range(12)
        for k in (0, 1)
    ]
    write_split(root, "train", images, texts)
    build_lmdb(root, ["train"])
    build_webdataset(root, ["train"], root / "wds", shard_size=5, source="lmdb")
    return root / "wds" / "train.txt"


def test_torchrun_two_ranks_two_workers_read_each_shard_sample_once(tmp_path: Path, shards: Path) -> None:
    """Real processes: 2 torchrun ranks × 2 DataLoader workers over the shards read every pair exactly once per
    epoch, in a new order each epoch."""
    script, out = tmp_path / "probe.py", tmp_path / "keys"
    script.write_text(SHARD_PROBE, encoding="utf-8")
    subprocess.run(_torchrun(2, str(script), str(shards), str(out)), check=True, env=_env(), cwd=REPO, timeout=300)
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    every = set(ranks[0]["epochs"]["0"] + ranks[1]["epochs"]["0"])  # the pairs' key hashes
    assert len(every) == 24
    for epoch in ("0", "1"):
        seen = ranks[0]["epochs"][epoch] + ranks[1]["epochs"][epoch]
        assert len(seen) == 24 and set(seen) == every, epoch  # each pair once, on one rank
        assert len(ranks[0]["epochs"][epoch]) == len(ranks[1]["epochs"][epoch]) == 12
    assert ranks[0]["epochs"]["0"] != ranks[0]["epochs"]["1"]


def test_torchrun_trains_from_shards(tmp_path: Path, shards: Path) -> None:
    argv = tiny_args(tmp_path, "--save-step-frequency", "2", steps=3, data=str(shards), batch=3)
    argv[argv.index("--num-workers") + 1] = "2"
    subprocess.run(
        _torchrun(2, "-m", "cn_clip.training.main", "--", *argv), check=True, env=_env(), cwd=REPO, timeout=300
    )
    log = next((tmp_path / "run").glob("out_*.log")).read_text()
    assert "Global Batch Size: 6" in log and "webdataset" in log.lower()
    assert latest_state(tmp_path)["module.logit_scale"].shape == ()
