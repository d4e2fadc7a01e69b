"""The `make demo` summary: parses the step outputs and fails clearly when one is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cn_clip.demo import main, read_zeroshot
from cn_clip.errors import CnClipError


def _recall(r1: float) -> dict:
    return {"predictions": "p.jsonl", "recall": {"r1": r1, "r5": 50.0, "r10": 75.0, "mean_recall": 40.0}}


def _write_outputs(demo: Path) -> None:
    (demo / "eval").mkdir(parents=True)
    (demo / "zeroshot").mkdir()
    summary = {
        "architecture": "ViT-Tiny@BERT-Tiny-chinese",
        "epoch": 8,
        "step": 136,
        "split": "valid",
        "num_texts": 44,
        "num_images": 44,
        "checkpoint": "ckpt.pt",
        "results": {"text_to_image": _recall(12.5), "image_to_text": _recall(25.0)},
    }
    (demo / "eval" / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (demo / "zeroshot" / "result.txt").write_text(
        "Result:\nzeroshot-top1: 0.25\nzeroshot-top5: 0.5\nzeroshot-mean-per-class: 0.2\nFinished.\n", encoding="utf-8"
    )


def test_summary_table(tmp_path: Path, capsys) -> None:
    _write_outputs(tmp_path)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "text→image       12.50   50.00   75.00   40.00" in out
    assert "top-1 25.00   top-5 50.00   mean-per-class 20.00" in out
    assert "cn_clip.search serve" not in out  # no index built


def test_summary_ends_with_the_serve_command(tmp_path: Path, capsys) -> None:
    _write_outputs(tmp_path)
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "meta.json").write_text("{}", encoding="utf-8")
    assert main([str(tmp_path)]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last == f"  python -m cn_clip.search serve --index {tmp_path / 'index'}"


def test_missing_step_output_is_named(tmp_path: Path) -> None:
    with pytest.raises(CnClipError, match="summary.json is missing"):
        main([str(tmp_path)])
    bad = tmp_path / "result.txt"
    bad.write_text("Traceback\n", encoding="utf-8")
    with pytest.raises(CnClipError, match="no 'zeroshot-top1:' line"):
        read_zeroshot(bad)


def test_bilingual_summary_table(tmp_path: Path, capsys) -> None:
    for code, r1, top1 in (("zh", 12.5, "0.25"), ("en", 6.25, "0.125")):
        single = tmp_path / "single" / code
        _write_outputs(single)
        (tmp_path / "eval" / code).mkdir(parents=True)
        (tmp_path / "zeroshot" / code).mkdir(parents=True)
        summary = json.loads((single / "eval" / "summary.json").read_text(encoding="utf-8"))
        summary["results"]["text_to_image"] = _recall(r1)
        (tmp_path / "eval" / code / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
        (tmp_path / "zeroshot" / code / "result.txt").write_text(f"zeroshot-top1: {top1}\nzeroshot-top5: 0.5\n")
    assert main(["--bilingual", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "zh→image     12.50   50.00   75.00   40.00     25.00     50.00   (Chinese captions / prompts)" in out
    assert "en→image      6.25   50.00   75.00   40.00     12.50     50.00   (English captions / prompts)" in out
    with pytest.raises(CnClipError, match="make demo-bilingual"):
        main(["--bilingual", str(tmp_path / "single")])
