"""Fuzzed texts and image bytes, and code-executing pickles offered to every loader."""

from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from cn_clip.cli.runner import run_cli
from cn_clip.errors import CnClipError, DataError
from tests.helpers import TINY_ARCH, TINY_FLAGS

pytestmark = pytest.mark.reliability
MARKER = Path("/tmp/cn_clip_pickle_ran")


def _random_text(rng: random.Random) -> str:
    length = rng.choice([0, 1, 5, 60, 400, 3000])
    chars = []
    for _ in range(length):
        cp = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x4E00, 0x9FFF), rng.randrange(0, 0x110000)])
        chars.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "?")
    return "".join(chars)


def test_tokenize_survives_random_unicode() -> None:
    from cn_clip.tokenizer import tokenize

    rng = random.Random(0)
    texts = [_random_text(rng) for _ in range(300)] + ["", " ", "\x00\ufffd\u200d", "字" * 10000]
    ids = tokenize(texts, context_length=52)
    assert ids.shape == (len(texts), 52) and ids.dtype == torch.long
    assert bool((ids[:, 0] == 101).all())
    assert bool(((ids == 102).sum(dim=1) == 1).all())
    assert int(ids.max()) < 21128 and int(ids.min()) >= 0


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_as_images_give_a_data_error(seed: int) -> None:
    import base64

    from cn_clip.data.lmdb_dataset import decode_image
    from cn_clip.transforms import image_transform

    raw = random.Random(seed).randbytes(random.Random(seed).randrange(0, 5000))
    with pytest.raises(DataError, match="image_id 42"):
        image_transform(64)(decode_image(base64.b64encode(raw), image_id=42))


def test_truncated_jpeg_gives_a_clear_error() -> None:
    from cn_clip.transforms import image_transform

    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="JPEG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2]))
    with pytest.raises((DataError, OSError)):
        image_transform(64)(truncated)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.fixture()
def evil_checkpoint(tmp_path: Path) -> Path:
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "step": 1, "state_dict": {"module.logit_scale": torch.tensor(1.0)}, "x": _Payload()}, path)
    yield path
    assert not MARKER.exists(), "a checkpoint loader executed pickled code"


def test_library_loaders_refuse_code(evil_checkpoint: Path) -> None:
    from cn_clip.models.factory import create_model, load_from_name

    with pytest.raises(CnClipError, match="refused to unpickle"):
        load_from_name(str(evil_checkpoint), device="cpu")
    with pytest.raises(CnClipError, match="refused to unpickle"):
        create_model(TINY_ARCH, checkpoint=evil_checkpoint)


@pytest.mark.parametrize(
    "argv",
    [
        ["cn_clip.eval.extract_features", "--extract-text-feats", "--text-data", "{texts}", "--resume", "{ckpt}"],
        ["cn_clip.training.main", "--train-data", "{lmdb}", "--resume", "{ckpt}", "--logs", "none"],
        ["cn_clip.convert", "to-hf", "{ckpt}", "{out}"],
        [
            "cn_clip.deploy.pytorch_to_onnx",
            "--model-arch",
            TINY_ARCH,
            "--pytorch-ckpt-path",
            "{ckpt}",
            "--save-onnx-path",
            "{out}/m",
            "--convert-text",
        ],
    ],
    ids=["extract_features", "training", "to_hf", "pytorch_to_onnx"],
)
def test_cli_loaders_refuse_code(evil_checkpoint: Path, tmp_path: Path, argv: list[str], capsys) -> None:
    import importlib

    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text_id": 1, "text": "猫"}\n', encoding="utf-8")
    values = {"ckpt": evil_checkpoint, "texts": texts, "lmdb": tmp_path, "out": tmp_path / "out"}
    args = [a.format(**values) for a in argv[1:]]
    if argv[0] in ("cn_clip.eval.extract_features", "cn_clip.training.main"):
        args += TINY_FLAGS
    module = importlib.import_module(argv[0])
    main = module.main
    try:
        code = run_cli(main, args)
    except SystemExit as exc:  # an entry point whose main already wraps run_cli
        code = exc.code
    assert code not in (0, None)
    assert "refused to unpickle" in capsys.readouterr().err


def test_lmdb_pair_reader_rejects_foreign_pickles() -> None:
    from cn_clip.data.formats import dumps_pair, loads_pair

    assert loads_pair(dumps_pair(1, "t", "猫")) == (1, "t", "猫")
    MARKER.unlink(missing_ok=True)
    for payload in (pickle.dumps(_Payload()), pickle.dumps([1, 2, "x"]), pickle.dumps((1, 2, 3))):
        with pytest.raises(DataError):
            loads_pair(payload, key="7")
    assert not MARKER.exists()
