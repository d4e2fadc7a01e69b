"""Image preprocessing, bit-identical to the reference ``cn_clip.clip.image_transform`` for 8-bit images.

The reference pipeline (compatibility.md#image-preprocessing) is, in this order: resize the PIL image to ``(R, R)``
with bicubic filtering
(a *squash*: no crop, aspect ratio not kept), ``convert("RGB")`` *after* the resize, ``ToTensor`` (float32,
/255, CHW), normalise with the CLIP mean/std. :func:`image_transform` builds exactly that from torchvision
transforms, with named steps, plus one step in front, :class:`PrepareImage`, which

* rejects anything that is not a ``PIL.Image.Image`` with a clear ``TypeError`` and turns decode failures of lazily
  loaded files into :class:`~cn_clip.errors.DataError`;
* rescales 16-bit, 32-bit integer and float images to the 8-bit range, where the reference clips them
(compatibility.md#fix-wide-range-images;
  rule in :func:`rescale_wide_range`). 8-bit modes (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, ...) pass untouched.

:func:`train_transform` is the reference's ``--use-augment`` pipeline (timm RandomResizedCrop + flip +
AutoAugment "original") with the RGB conversion before the last three steps.

torchvision, timm and PIL are imported when a transform is built, not when this module is imported.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cn_clip.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

_logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = 224
AUGMENT_SCALE = (0.9, 1.0)

UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
WIDE_RANGE_MODES = (*UINT16_MODES, "I", "F")
RESIZE_MODES = ("squash", "shortest")
_ROUNDING = 0.5  # PIL truncates when converting F to 8 bits; adding 0.5 first makes it round to nearest


# --------------------------------------------------------------------------------------------------------------------
# Wide-range images (compatibility.md#fix-wide-range-images)
# --------------------------------------------------------------------------------------------------------------------


def _scale_factor(mode: str, low: float, high: float) -> tuple[float, float] | None:
    """``(offset, scale)`` such that ``(v - offset) * scale`` lies in 0–255, or ``None`` to keep the values."""
    if mode in UINT16_MODES:
        return 0.0, 255.0 / 65535.0
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return 0.0, 255.0
    if low >= 0.0 and high <= 255.0:
        return None
    if mode == "I" and low >= 0 and high <= 65535:
        return 0.0, 255.0 / 65535.0
    if high == low:  # constant image outside 0–255: mid-grey is as good as any other level
        return low - 127.5, 1.0
    return low, 255.0 / (high - low)


def rescale_wide_range(image: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit integer or float image linearly into 0–255 (returned as a float ``F`` image).

    Rule (documented deviation from the reference, which clips these modes to 0–255):

    * ``I;16`` (unsigned 16-bit, any byte order): ``v * 255 / 65535`` (the full 16-bit range);
    * ``F`` with all values in [0, 1]: ``v * 255``;
    * ``I`` and ``F`` with all values already in [0, 255]: unchanged (the output equals the reference's);
    * ``I`` with all values in [0, 65535] (a 16-bit file opened as ``I``): ``v * 255 / 65535``;
    * anything else: min–max, ``(v - min) * 255 / (max - min)``; a constant image becomes mid-grey.

    A rescaled image is returned in float precision (mode ``F``) so that the bicubic resize works on unrounded
    values; it holds ``v' + 0.5`` because PIL's later ``convert("RGB")`` truncates floats, so the final 8-bit value
    is ``v'`` rounded to nearest. NaN or infinite pixels raise :class:`DataError`.
    """
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float64)
    if not np.isfinite(pixels).all():
        raise DataError(f"{_describe(image)} contains NaN or infinite pixel values")
    if pixels.size == 0:
        return image
    factor = _scale_factor(image.mode, float(pixels.min()), float(pixels.max()))
    if factor is None:
        return image
    offset, scale = factor
    scaled = np.clip((pixels - offset) * scale, 0.0, 255.0) + _ROUNDING
    return Image.fromarray(scaled.astype(np.float32))


def _describe(image: Any) -> str:
    filename = getattr(image, "filename", "") or ""
    where = f" {filename!r}" if filename else ""
    return f"image{where} (mode {getattr(image, 'mode', '?')}, size {getattr(image, 'size', '?')})"


# --------------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------------


class PrepareImage:
    """Check that the input is a PIL image, load it, and rescale wide-range modes (identity for 8-bit modes)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(
                f"image transforms take a PIL.Image.Image, got {type(image).__name__}; open files with "
                "PIL.Image.open(path) (or PIL.Image.open(io.BytesIO(data)) for bytes) first"
            )
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as error:  # PIL's decoders raise these for corrupt data
            raise DataError(f"cannot decode {_describe(image)}: {error}") from error
        if image.mode in WIDE_RANGE_MODES:
            return rescale_wide_range(image)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(wide-range modes {', '.join(WIDE_RANGE_MODES)} rescaled to 0-255)"


class ConvertRGB:
    """``PIL.Image.convert("RGB")`` (palette, alpha, grey, CMYK, ... to three 8-bit channels)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SquashResize:
    """Resize to ``(size, size)`` with bicubic filtering, ignoring the aspect ratio (no crop), as the reference.

    Wraps ``torchvision.transforms.Resize((size, size), BICUBIC)``, which on PIL images calls ``Image.resize`` (with
    PIL's antialiasing); palette and 1-bit images are therefore resized with nearest-neighbour by PIL.
    """

    def __init__(self, size: int) -> None:
        from torchvision.transforms import InterpolationMode, Resize

        self.size = size
        self._resize = Resize((size, size), interpolation=InterpolationMode.BICUBIC)

    def __call__(self, image: Image.Image) -> Any:
        return self._resize(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size=({self.size}, {self.size}), interpolation=bicubic, aspect ratio not kept)"


# --------------------------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------------------------


def _check_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size


def image_transform(
    image_size: int = DEFAULT_IMAGE_SIZE, *, resize_mode: str = "squash", convert_first: bool = False
) -> Any:
    """PIL image → normalised ``FloatTensor[3, image_size, image_size]``; the reference's eval preprocessing.

    Defaults reproduce the reference bit for bit (8-bit modes). Opt-ins (compatibility.md#fix-resize-order):
    ``resize_mode="shortest"`` resizes the shorter side to ``image_size`` and centre-crops (OpenAI CLIP / HF
    processor style) instead of squashing; ``convert_first=True`` converts to RGB before resizing (palette images
    are then resized in RGB with bicubic filtering instead of nearest-neighbour in palette space).
    """
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    image_size = _check_size(image_size)
    if resize_mode == "squash":
        resize: list[Any] = [SquashResize(image_size)]
    elif resize_mode == "shortest":
        resize = [Resize(image_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(image_size)]
    else:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    geometry = [ConvertRGB(), *resize] if convert_first else [*resize, ConvertRGB()]
    return Compose([PrepareImage(), *geometry, ToTensor(), Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])


def train_transform(image_size: int = DEFAULT_IMAGE_SIZE) -> Any:
    """The reference's ``--use-augment`` training pipeline (distributional parity only; it is random).

    timm ``create_transform(is_training=True, scale=(0.9, 1.0), auto_augment="original", interpolation="bicubic",
    color_jitter=None)``: RandomResizedCrop → RandomHorizontalFlip → (RGB) → AutoAugment → ToTensor → Normalize,
    with :class:`PrepareImage` in front.
    """
    from timm.data import create_transform
    from torchvision.transforms import Compose

    image_size = _check_size(image_size)
    timm_transform = create_transform(
        input_size=image_size,
        scale=AUGMENT_SCALE,
        is_training=True,
        color_jitter=None,
        auto_augment="original",
        interpolation="bicubic",
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
    )
    steps = list(timm_transform.transforms)
    return Compose([PrepareImage(), *steps[:-3], ConvertRGB(), *steps[-3:]])
