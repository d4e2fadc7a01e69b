"""The fixtures every test can use (names, flags and builders they rest on are in ``tests/helpers.py``).

Session-scoped fixtures are built once per run and must be treated as read-only: write next to them in
``tmp_path``, never into them. Function-scoped ones are fresh for each test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.data.helpers import good_split
from tests.helpers import RN_TINY_ARCH, TINY_ARCH, make_retrieval_dataset, save_reference_checkpoint


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_arch() -> str:
    """``ViT-Tiny@BERT-Tiny-chinese``: the architecture of every tiny fixture below."""
    return TINY_ARCH


@pytest.fixture()
def tiny_model():
    """A fresh, randomly initialised (seed 0) tiny ViT model."""
    from cn_clip.models.factory import create_model

    return create_model(TINY_ARCH)


@pytest.fixture(scope="session")
def vit_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT model with the deterministic fixture weights, in the reference checkpoint layout."""
    return save_reference_checkpoint(TINY_ARCH, tmp_path_factory.mktemp("ckpt") / "vit_tiny.pt")


@pytest.fixture(scope="session")
def rn_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ResNet model (``RN-Tiny@BERT-Tiny-chinese``) like ``vit_ckpt``."""
    return save_reference_checkpoint(RN_TINY_ARCH, tmp_path_factory.mktemp("ckpt") / "rn_tiny.pt")


@pytest.fixture(scope="session")
def vit_model(vit_ckpt: Path):
    """``vit_ckpt`` loaded (shared: do not train or modify it)."""
    from cn_clip.models.factory import create_model

    return create_model(TINY_ARCH, checkpoint=vit_ckpt)


@pytest.fixture(scope="session")
def rn_model(rn_ckpt: Path):
    """``rn_ckpt`` loaded (shared: do not train or modify it)."""
    from cn_clip.models.factory import create_model

    return create_model(RN_TINY_ARCH, checkpoint=rn_ckpt)


@pytest.fixture(scope="session")
def retrieval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-image, 14-text ``valid`` split in the evaluation layout: ``valid_texts.jsonl`` + ``lmdb/valid/imgs``."""
    return make_retrieval_dataset(tmp_path_factory.mktemp("retrieval"))


@pytest.fixture(scope="session")
def tiny_lmdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder as the recipes expect it: raw 8-pair ``train`` and 4-pair ``valid`` splits and their LMDBs
    (``lmdb/train``, ``lmdb/valid``) built by our builder."""
    from cn_clip.data.lmdb_build import build_lmdb

    root = tmp_path_factory.mktemp("tiny_lmdb")
    good_split(root, "train", n=8)
    good_split(root, "valid", n=4)
    build_lmdb(root, ["train", "valid"])
    return root


@pytest.fixture()
def raw_dir(tmp_path: Path) -> Path:
    """A 3-pair raw ``train`` split (``train_imgs.tsv`` + ``train_texts.jsonl``) to build an LMDB from."""
    good_split(tmp_path / "raw")
    return tmp_path / "raw"
