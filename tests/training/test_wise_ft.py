"""WiSE-FT: exact endpoints, element-wise mean, architecture checks, and the alpha search with its report."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from cn_clip.cli.runner import run_cli
from cn_clip.training import wise_ft
from tests.helpers import make_class_folder, png_bytes
from tests.helpers import seeded_checkpoint as tiny_checkpoint


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("wise")
    return tiny_checkpoint(root / "a.pt", seed=1), tiny_checkpoint(root / "b.pt", seed=2)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_0_and_1_reproduce_the_endpoints_exactly(endpoints, tmp_path: Path, alpha: float) -> None:
    a, b = endpoints
    out = tmp_path / "c.pt"
    assert (
        run_cli(wise_ft.main, ["--zeroshot", str(a), "--finetuned", str(b), "--alpha", str(alpha), "--out", str(out)])
        == 0
    )
    got, want = _state(out), _state(a if alpha == 0 else b)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"epoch", "step", "name", "state_dict"} and "alpha=" in ckpt["name"]


def test_alpha_half_is_the_element_wise_mean_and_loads(endpoints, tmp_path: Path) -> None:
    from cn_clip.models.factory import load_from_name

    a, b = endpoints
    out = tmp_path / "c.pt"
    assert (
        run_cli(wise_ft.main, ["--zeroshot", str(a), "--finetuned", str(b), "--alpha", "0.5", "--out", str(out)]) == 0
    )
    got, sa, sb = _state(out), _state(a), _state(b)
    changed = 0
    for key, value in got.items():
        assert torch.equal(value, (sa[key] + sb[key]) / 2), key
        changed += not torch.equal(value, sa[key])
    assert changed > 10  # the two seeds differ, so the mean really mixes them
    model, _ = load_from_name(str(out), device="cpu")
    assert model.cfg.vision.kind == "vit"


def test_different_architectures_are_a_clear_error(endpoints, tmp_path: Path, capsys) -> None:
    a, _ = endpoints
    rn = tiny_checkpoint(tmp_path / "rn.pt", arch="RN-Tiny@BERT-Tiny-chinese")
    out = tmp_path / "c.pt"
    code = run_cli(wise_ft.main, ["--zeroshot", str(a), "--finetuned", str(rn), "--alpha", "0.5", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "different architectures" in err and "only in" in err and "visual." in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_shape_mismatch_names_the_key() -> None:
    a = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    b = {"w": torch.zeros(2, 4), "b": torch.zeros(3)}
    with pytest.raises(Exception, match=r"shapes differ: w \[2, 3\] vs \[2, 4\]"):
        wise_ft.interpolate(a, b, 0.5)


def test_integer_buffers_come_from_the_nearer_endpoint() -> None:
    a = {"n": torch.tensor(3), "w": torch.ones(2, dtype=torch.float16)}
    b = {"n": torch.tensor(7), "w": torch.zeros(2)}
    mixed = wise_ft.interpolate(a, b, 0.25)
    assert (
        int(mixed["n"]) == 3 and mixed["w"].dtype == torch.float32 and torch.equal(mixed["w"], torch.full((2,), 0.75))
    )
    assert int(wise_ft.interpolate(a, b, 0.75)["n"]) == 7


def _lmdb_split(root: Path) -> Path:
    from cn_clip.data.lmdb_build import build_lmdb

    root.mkdir(parents=True)
    rows, texts = [], []
    for i in range(6):
        rows.append(f"{100 + i}\t{base64.b64encode(png_bytes(i)).decode()}\n")
        texts.append(json.dumps({"text_id": i + 1, "text": f"第{i}张图片", "image_ids": [100 + i]}, ensure_ascii=False))
    (root / "valid_imgs.tsv").write_text("".join(rows), encoding="utf-8")
    (root / "valid_texts.jsonl").write_text("\n".join(texts) + "\n", encoding="utf-8")
    build_lmdb(root, ["valid"])
    return root / "lmdb" / "valid"


def test_alpha_search_prints_the_table_and_writes_json_plot_and_checkpoint(endpoints, tmp_path: Path, capsys) -> None:
    a, b = endpoints
    split = _lmdb_split(tmp_path / "raw")
    retention = make_class_folder(tmp_path / "cls")
    out, report = tmp_path / "picked.pt", tmp_path / "report"
    argv = [
        "--zeroshot", str(a), "--finetuned", str(b), "--alphas", "0,0.5,1", "--eval-data", str(split),
        "--retention-data", str(retention), "--max-retention-drop", "100", "--out", str(out),
        "--report-dir", str(report), "--num-workers", "0", "--device", "cpu", "--batch-size", "4",
    ]  # fmt: skip
    assert run_cli(wise_ft.main, argv) == 0
    printed = capsys.readouterr().out
    assert "target mean recall" in printed and "<- picked" in printed and "picked alpha" in printed
    data = json.loads((report / "wise_ft_sweep.json").read_text())
    assert [r["alpha"] for r in data["rows"]] == [0.0, 0.5, 1.0]
    assert data["rows"][0]["retention_drop"] == 0.0
    best = max(data["rows"], key=lambda r: (r["mean_recall"], -r["alpha"]))
    assert data["picked"] == best
    assert (report / "wise_ft_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    want = wise_ft.interpolate(wise_ft.read_endpoint(str(a)), wise_ft.read_endpoint(str(b)), best["alpha"])
    assert all(torch.equal(_state(out)[f"module.{k}"], v) for k, v in want.items())


def test_pick_alpha_respects_the_retention_budget() -> None:
    rows = [
        wise_ft.SweepRow(0.0, 10.0, 50.0, 0.0),
        wise_ft.SweepRow(0.5, 30.0, 48.0, 2.0),
        wise_ft.SweepRow(1.0, 40.0, 40.0, 10.0),
    ]
    assert wise_ft.pick_alpha(rows, 2.0).alpha == 0.5
    assert wise_ft.pick_alpha(rows, 20.0).alpha == 1.0
    assert wise_ft.pick_alpha(rows, 0.0).alpha == 0.0
    with pytest.raises(Exception, match="no alpha keeps retention"):
        wise_ft.pick_alpha(rows[1:], 1.0)
