"""cn_clip.transforms: bit-identical to the reference image_transform for 8-bit images (fixtures in tests/fixtures)."""

from __future__ import annotations

import hashlib
import io
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cn_clip.errors import DataError
from cn_clip.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ConvertRGB,
    PrepareImage,
    SquashResize,
    image_transform,
    rescale_wide_range,
    train_transform,
)

FIXTURE = Path(__file__).parent / "fixtures" / "transform_images.npz"
SIZES = (224, 64, 16)
FULL_SIZE = 16
# cn_clip rescales these where the reference clips (compatibility.md#fix-wide-range-images)
WIDE_RANGE = ("i16", "i32", "f32")


@lru_cache(maxsize=1)
def fixture() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def rebuild(name: str) -> Image.Image:
    """The fixture image ``name`` exactly as the reference saw it."""
    data = fixture()

    def field(key: str) -> np.ndarray:
        return data[f"{name}/input/{key}"]

    image = Image.frombytes(str(field("mode")), tuple(int(v) for v in field("size")), field("data").tobytes())
    if f"{name}/input/palette" in data:
        image.putpalette(field("palette").tobytes(), rawmode=str(field("palette_mode")))
    if f"{name}/input/transparency" in data:
        value = field("transparency")
        image.info["transparency"] = value.item() if value.ndim == 0 else value.tobytes()
    return image


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


NAMES = [str(name) for name in fixture()["names"]]
EIGHT_BIT = [name for name in NAMES if name not in WIDE_RANGE]


def test_fixture_covers_every_mode() -> None:
    modes = {rebuild(name).mode for name in NAMES}
    assert {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"} <= modes
    assert "p_transparency" in NAMES and "astronaut_crop" in NAMES


@pytest.mark.parity
@pytest.mark.parametrize("name", EIGHT_BIT)
def test_bit_identical_to_reference(name: str) -> None:
    image = rebuild(name)
    for size in SIZES:
        out = image_transform(size)(image)
        assert out.dtype == torch.float32 and out.shape == (3, size, size)
        assert sha256(out) == str(fixture()[f"{name}/sha256/{size}"]), f"{name} ({image.mode}) at {size}"
    expected = torch.from_numpy(fixture()[f"{name}/tensor/{FULL_SIZE}"])
    assert torch.equal(image_transform(FULL_SIZE)(image), expected)


@pytest.mark.parity
@pytest.mark.parametrize("name", WIDE_RANGE)
def test_wide_range_images_are_rescaled_not_clipped(name: str) -> None:
    """The fixtures hold one grey image as I;16 (x257), I (x1000 - 50000) and F (/255); all must look like it."""
    gray = np.asarray(rebuild("l"), dtype=np.float64)
    if name == "i32":  # values span -50000..205000: min-max stretch
        gray = (gray - gray.min()) * 255.0 / (gray.max() - gray.min())
    expected = image_transform(64)(Image.fromarray(gray.astype(np.float32) + 0.5))  # + 0.5: round, not truncate
    out = image_transform(64)(rebuild(name))
    assert (out - expected).abs().max() < 1e-6
    assert sha256(out) != str(fixture()[f"{name}/sha256/64"])  # the reference clips: deliberately different
    eight_bit = image_transform(64)(rebuild("l"))
    assert (out - eight_bit).abs().max() <= 1.01 / 255 / min(OPENAI_CLIP_STD) or name == "i32"


def test_rescale_rules() -> None:
    full16 = Image.frombytes("I;16", (2, 1), np.array([0, 65535], dtype="<u2").tobytes())
    # Rescaled images hold v + 0.5 so that PIL's truncating float -> 8-bit conversion rounds.
    assert np.asarray(rescale_wide_range(full16)).tolist() == [[0.5, 255.5]]
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(rescale_wide_range(unit_float)).tolist() == [[0.5, 128.0, 255.5]]
    assert np.asarray(rescale_wide_range(unit_float).convert("L")).tolist() == [[0, 128, 255]]
    in_range = Image.fromarray(np.array([[0, 17, 255]], dtype=np.int32))
    assert rescale_wide_range(in_range) is in_range  # untouched: same output as the reference
    sixteen_as_i = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert np.asarray(rescale_wide_range(sixteen_as_i)).tolist() == [[0.5, 255.5]]
    signed = Image.fromarray(np.array([[-10, 0, 10]], dtype=np.int32))
    assert np.asarray(rescale_wide_range(signed)).tolist() == [[0.5, 128.0, 255.5]]
    constant = Image.fromarray(np.full((2, 2), 1e6, dtype=np.float32))
    assert np.asarray(rescale_wide_range(constant)).tolist() == [[128.0, 128.0], [128.0, 128.0]]
    with pytest.raises(DataError, match="NaN"):
        rescale_wide_range(Image.fromarray(np.array([[np.nan, 1.0]], dtype=np.float32)))


def test_sixteen_bit_png_round_trip(tmp_path: Path) -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype("<u2")
    Image.frombytes("I;16", (64, 64), ramp.tobytes()).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as image:
        assert image.mode in ("I;16", "I")
        out = image_transform(64)(image)
    expected = ramp.astype(np.float64) * 255 / 65535
    rgb = (out * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1) + torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) * 255
    assert np.abs(rgb[0].numpy() - expected).max() < 0.51  # no clipping at 255: the ramp survives


@pytest.mark.parametrize("bad", [b"\x89PNG...", "photo.jpg", np.zeros((4, 4, 3), np.uint8), torch.zeros(3, 4, 4), None])
def test_non_images_are_rejected(bad: object) -> None:
    with pytest.raises(TypeError, match=r"PIL\.Image\.Image"):
        image_transform(16)(bad)


def test_corrupt_file_raises_data_error(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with Image.open(path) as image, pytest.raises(DataError, match="truncated.png"):
        image_transform(16)(image)


def test_pipeline_is_named() -> None:
    transform = image_transform(224)
    steps = [type(step).__name__ for step in transform.transforms]
    assert steps == ["PrepareImage", "SquashResize", "ConvertRGB", "ToTensor", "Normalize"]
    assert "SquashResize(size=(224, 224), interpolation=bicubic, aspect ratio not kept)" in repr(transform)
    assert isinstance(transform.transforms[1], SquashResize) and isinstance(transform.transforms[2], ConvertRGB)


def test_opt_in_variants() -> None:
    image = rebuild("rgb_big")  # 90x60
    squash = image_transform(32)(image)
    shortest = image_transform(32, resize_mode="shortest")(image)
    convert_first = image_transform(32, convert_first=True)(image)
    assert squash.shape == shortest.shape == convert_first.shape == (3, 32, 32)
    assert not torch.equal(squash, shortest)
    assert torch.equal(squash, convert_first)  # RGB input: conversion order does not matter
    palette = rebuild("p")
    assert not torch.equal(image_transform(32)(palette), image_transform(32, convert_first=True)(palette))
    with pytest.raises(ValueError, match="resize_mode"):
        image_transform(32, resize_mode="crop")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            image_transform(bad)  # type: ignore[arg-type]


def test_train_transform_structure_matches_reference_recipe() -> None:
    from timm.data import create_transform

    ours = train_transform(64)
    timm_steps = create_transform(
        input_size=64,
        scale=(0.9, 1.0),
        is_training=True,
        color_jitter=None,
        auto_augment="original",
        interpolation="bicubic",
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
    ).transforms
    names = [type(step).__name__ for step in ours.transforms]
    assert names == [
        "PrepareImage",
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "ConvertRGB",
        "AutoAugment",
        "MaybeToTensor",
        "Normalize",
    ]
    assert [repr(s) for s in ours.transforms[1:3] + ours.transforms[4:]] == [repr(s) for s in timm_steps]
    crop = ours.transforms[1]
    assert crop.scale == (0.9, 1.0) and crop.size == (64, 64)
    assert len(ours.transforms[4].policy) == 25  # AutoAugment "original": 25 sub-policies


def test_train_transform_is_random_with_right_shape() -> None:
    transform = train_transform(32)
    random.seed(0)
    torch.manual_seed(0)
    outputs = [transform(rebuild(name)) for name in ("rgb", "p", "l", "rgba", "i16") for _ in range(4)]
    assert all(out.shape == (3, 32, 32) and out.dtype == torch.float32 for out in outputs)
    assert len({sha256(out) for out in outputs}) > 10


def test_prepare_image_passes_eight_bit_images_through() -> None:
    image = rebuild("p_transparency")
    assert PrepareImage()(image) is image


def test_import_is_lazy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cn_clip.transforms\n"
        "assert not [m for m in ('torch', 'torchvision', 'timm', 'PIL') if m in sys.modules]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
