"""A small real image–Chinese-caption dataset built offline from the photos scikit-image ships (``skimage/data``).

22 source images (astronaut, cat, coffee, coins, rocket, galaxies, …; public domain or CC0, see data_docs/demo.md),
each with four hand-written Chinese captions in ``demo/captions.json``. Every source yields ``views`` deterministic
augmented views (random crop, flip, brightness), shrunk to ``max_side`` pixels and stored as JPEG:

    {out}/datasets/demo/{train,valid,test}_{imgs.tsv,texts.jsonl}   retrieval, reference raw layout
    {out}/datasets/demo_cls/{label_cn.txt,label.txt,test/000/…}      zero-shot classification (ImageFolder)

Per source the last two views are test, the two before valid, the rest train; train images carry two captions,
valid/test images one. Same inputs and Pillow version → byte-identical output.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from cn_clip.errors import DataError
from cn_clip.extras import MissingExtraError, missing_message

_logger = logging.getLogger(__name__)
CAPTIONS = Path(__file__).with_name("demo") / "captions.json"
DATASET, CLS_DATASET, BILINGUAL_DATASET = "demo", "demo_cls", "demo_bilingual"
# English zero-shot prompts of the bilingual demo (the Chinese ones are the reference's bundled set)
ENGLISH_TEMPLATES = (
    "a photo of the {c}.",
    "a picture of the {c}.",
    "an image of the {c}.",
    "a close-up photo of the {c}.",
    "a black and white photo of the {c}.",
)


@dataclass(frozen=True)
class DemoClass:
    file: str
    label: str
    label_cn: str
    captions: tuple[str, ...]
    captions_en: tuple[str, ...] = ()  # English counterparts, same order (the bilingual demo)


def load_classes() -> list[DemoClass]:
    spec = json.loads(CAPTIONS.read_text(encoding="utf-8"))
    return [
        DemoClass(c["file"], c["label"], c["label_cn"], tuple(c["captions"]), tuple(c.get("captions_en", ())))
        for c in spec["classes"]
    ]


def skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")  # locate the files without importing scikit-image
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(missing_message("skimage", "the demo dataset (scikit-image's bundled images)"))
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _view(image, rng: random.Random, index: int, max_side: int):
    from PIL import Image, ImageEnhance, ImageOps

    img = image
    if index > 0:  # view 0 is the whole picture
        width, height = img.size
        area = rng.uniform(0.45, 1.0) * width * height
        aspect = rng.uniform(3 / 4, 4 / 3)
        crop_w = min(width, max(8, round((area * aspect) ** 0.5)))
        crop_h = min(height, max(8, round((area / aspect) ** 0.5)))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        img = img.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    img = img.copy()
    img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return img


def _jpeg(img, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _source(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("RGBA", "LA", "P"):  # silhouettes/logos: flatten on white
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, "white")
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("L" if img.mode in ("L", "I;16", "I") else "RGB")


def _split_of(view: int, views: int) -> str:
    if view >= views - 2:
        return "test"
    return "valid" if view >= views - 4 else "train"


def _text_record(text_id: int, text: str, image_id: int) -> str:
    return json.dumps({"text_id": text_id, "text": text, "image_ids": [image_id]}, ensure_ascii=False) + "\n"


def make_demo(
    out: str | Path, views: int = 16, max_side: int = 128, seed: int = 0, bilingual: bool = False
) -> dict[str, int]:
    """Write the demo datasets under ``out/datasets``; returns counts.

    ``bilingual``: ``demo_bilingual`` instead of ``demo``: the same images; train images carry their Chinese and their
    English captions; ``valid``/``test`` hold the Chinese captions and ``valid_en``/``test_en`` (same images) the
    English ones, so one evaluation per language scores zh→image and en→image. ``demo_cls`` gains
    ``templates_en.txt`` (English prompts for ``label.txt``). Without it, the output is the Chinese-only demo,
    unchanged."""
    from cn_clip.data.formats import b64encode_image
    from cn_clip.fileio import atomic_dir

    if views < 5:
        raise DataError("views must be at least 5 (train, valid and test each need views)")
    classes = load_classes()
    data_dir = skimage_data_dir()
    missing = [c.file for c in classes if not (data_dir / c.file).is_file()]
    if missing:
        raise DataError(f"scikit-image in {data_dir} lacks {', '.join(missing)} (upgrade scikit-image)")
    rows: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    texts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    texts_en: dict[str, list[str]] = {"valid": [], "test": []}
    missing_en = [c.file for c in classes if bilingual and len(c.captions_en) != len(c.captions)]
    if missing_en:
        raise DataError(f"{CAPTIONS}: {', '.join(missing_en)} lack English captions (captions_en)")
    root = Path(out) / "datasets"
    image_id = text_id = 0
    with atomic_dir(root / CLS_DATASET, overwrite=True) as cls_dir:
        for class_index, cls in enumerate(classes):
            rng = random.Random(f"{seed}:{cls.file}")
            source = _source(data_dir / cls.file)
            folder = cls_dir / "test" / f"{class_index:03d}"
            folder.mkdir(parents=True)
            for view in range(views):
                raw = _jpeg(_view(source, rng, view, max_side))
                split = _split_of(view, views)
                image_id += 1
                rows[split].append(f"{image_id}\t{b64encode_image(raw)}\n")
                if split != "train":
                    (folder / f"{image_id}.jpg").write_bytes(raw)
                n_captions = 2 if split == "train" else 1
                for k in range(n_captions):
                    text_id += 1
                    which = (view * n_captions + k) % len(cls.captions)
                    texts[split].append(_text_record(text_id, cls.captions[which], image_id))
                    if bilingual:  # the English caption of the same picture
                        text_id += 1
                        record = _text_record(text_id, cls.captions_en[which], image_id)
                        (texts if split == "train" else texts_en)[split].append(record)
        (cls_dir / "label_cn.txt").write_text("".join(c.label_cn + "\n" for c in classes), encoding="utf-8")
        (cls_dir / "label.txt").write_text("".join(c.label + "\n" for c in classes), encoding="utf-8")
        if bilingual:
            (cls_dir / "templates_en.txt").write_text("".join(t + "\n" for t in ENGLISH_TEMPLATES), encoding="utf-8")
    with atomic_dir(root / (BILINGUAL_DATASET if bilingual else DATASET), overwrite=True) as raw_dir:
        for split in rows:
            (raw_dir / f"{split}_imgs.tsv").write_text("".join(rows[split]), encoding="utf-8")
            (raw_dir / f"{split}_texts.jsonl").write_text("".join(texts[split]), encoding="utf-8")
        for split in texts_en if bilingual else ():
            (raw_dir / f"{split}_en_imgs.tsv").write_text("".join(rows[split]), encoding="utf-8")
            (raw_dir / f"{split}_en_texts.jsonl").write_text("".join(texts_en[split]), encoding="utf-8")
    counts = {f"{split}_images": len(rows[split]) for split in rows} | {"texts": text_id, "classes": len(classes)}
    _logger.info("demo dataset: %s", counts)
    return counts
