"""The summary printed at the end of ``make demo``: retrieval recall, zero-shot accuracy and where the files are.

Usage: ``python -m cn_clip.demo DEMO_DIR`` after the Makefile's demo steps have run; ``python -m cn_clip.demo
--bilingual DIR`` after ``make demo-bilingual`` (zh→image and en→image recall, zero-shot with each language's prompts).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path

from cn_clip.cli.runner import run_cli
from cn_clip.errors import CnClipError

_ZEROSHOT_LINE = re.compile(r"^zeroshot-(top1|top5|mean-per-class):\s*([0-9.]+)\s*$")


def read_zeroshot(result_txt: Path) -> dict[str, float]:
    """Parse the ``zeroshot-*`` lines that ``zeroshot_evaluation`` prints (captured by the Makefile)."""
    scores = {}
    for line in result_txt.read_text(encoding="utf-8").splitlines():
        match = _ZEROSHOT_LINE.match(line.strip())
        if match:
            scores[match.group(1)] = 100 * float(match.group(2))
    if "top1" not in scores:
        raise CnClipError(f"{result_txt}: no 'zeroshot-top1:' line (did the zero-shot step fail?)")
    return scores


def summary_lines(demo_dir: Path) -> list[str]:
    eval_summary = demo_dir / "eval" / "summary.json"
    zeroshot_txt = demo_dir / "zeroshot" / "result.txt"
    for path in (eval_summary, zeroshot_txt):
        if not path.is_file():
            raise CnClipError(f"{path} is missing; run `make demo` to produce it")
    summary = json.loads(eval_summary.read_text(encoding="utf-8"))
    zeroshot = read_zeroshot(zeroshot_txt)
    lines = [
        "",
        f"cn_clip demo — {summary['architecture']}, checkpoint epoch {summary['epoch']} @ {summary['step']} steps",
        f"retrieval on the {summary['split']} split ({summary['num_texts']} texts, {summary['num_images']} images)",
        f"{'direction':<14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}",
    ]
    for direction, label in (("text_to_image", "text→image"), ("image_to_text", "image→text")):
        recall = summary["results"][direction]["recall"]
        lines.append(
            f"{label:<14}{recall['r1']:>8.2f}{recall['r5']:>8.2f}{recall['r10']:>8.2f}{recall['mean_recall']:>8.2f}"
        )
    lines += [
        "zero-shot classification (demo_cls, Chinese prompts)",
        f"  top-1 {zeroshot['top1']:.2f}   top-5 {zeroshot.get('top5', float('nan')):.2f}"
        f"   mean-per-class {zeroshot.get('mean-per-class', float('nan')):.2f}",
        "files",
        f"  checkpoint      {summary['checkpoint']}",
        f"  predictions     {summary['results']['text_to_image']['predictions']}",
        f"                  {summary['results']['image_to_text']['predictions']}",
        f"  evaluation JSON {demo_dir / 'eval' / 'output.json'}, {demo_dir / 'eval' / 'output_tr.json'}",
        f"  zero-shot JSON  {demo_dir / 'zeroshot' / 'demo_cls.json'}",
    ]
    if (demo_dir / "index" / "meta.json").is_file():
        lines += [
            "search page and API for the validation images (open http://127.0.0.1:8000/):",
            f"  python -m cn_clip.search serve --index {demo_dir / 'index'}",
        ]
    return lines


LANGUAGES = (("zh", "Chinese"), ("en", "English"))


def bilingual_lines(demo_dir: Path) -> list[str]:
    """The ``make demo-bilingual`` table: per language, text→image recall and zero-shot accuracy."""
    rows = []
    for code, name in LANGUAGES:
        eval_summary = demo_dir / "eval" / code / "summary.json"
        zeroshot_txt = demo_dir / "zeroshot" / code / "result.txt"
        for path in (eval_summary, zeroshot_txt):
            if not path.is_file():
                raise CnClipError(f"{path} is missing; run `make demo-bilingual` to produce it")
        summary = json.loads(eval_summary.read_text(encoding="utf-8"))
        rows.append((code, name, summary, read_zeroshot(zeroshot_txt)))
    first = rows[0][2]
    lines = [
        "",
        f"cn_clip bilingual demo — {first['architecture']}, one model trained on Chinese + English captions, "
        f"checkpoint epoch {first['epoch']} @ {first['step']} steps",
        f"text→image on the valid images ({first['num_images']}), captions in each language; zero-shot on demo_cls",
        f"{'language':<10}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}{'zs top-1':>10}{'zs top-5':>10}",
    ]
    for code, name, summary, zeroshot in rows:
        recall = summary["results"]["text_to_image"]["recall"]
        lines.append(
            f"{code + '→image':<10}{recall['r1']:>8.2f}{recall['r5']:>8.2f}{recall['r10']:>8.2f}"
            f"{recall['mean_recall']:>8.2f}{zeroshot['top1']:>10.2f}{zeroshot.get('top5', float('nan')):>10.2f}"
            f"   ({name} captions / prompts)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir", type=Path, help="the demo output directory (DEMO in the Makefile)")
    parser.add_argument("--bilingual", action="store_true", help="the make demo-bilingual summary (DEMO_BI)")
    args = parser.parse_args(argv)
    print("\n".join(bilingual_lines(args.demo_dir) if args.bilingual else summary_lines(args.demo_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
