"""Text towers from any Hugging Face encoder (``hf:FOLDER`` / ``"hf_model"`` tower configs) and the tokenizer
dispatch: tiny local XLM-R and CLIP-text folders (tests/fixtures/gen_hf_towers.py), nothing downloaded."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip.errors import CheckpointError, ConfigError
from cn_clip.models.config import HFTextCfg
from cn_clip.models.factory import create_model, resolve_config
from cn_clip.tokenizer import FullTokenizer, HFTokenizer, get_tokenizer, tokenize
from tests.training.helpers import latest_state, tiny_args, train

HF_TOWERS = Path(__file__).parents[1] / "fixtures" / "hf_towers"
XLMR = HF_TOWERS / "tiny-xlm-roberta"
CLIP_TEXT = HF_TOWERS / "tiny-clip-text"
XLMR_ARCH = f"ViT-Tiny@hf:{XLMR}"
CAPTIONS = ["a photo of a cat", "一只猫坐在沙发上", "ein Hund läuft am Strand entlang  und   springt", "猫の写真です"]


def _with_text(arch: str, **changes) -> object:
    cfg = resolve_config(arch)
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **changes))


def test_hf_tower_is_automodel_with_sdpa_and_open_clip_keys() -> None:
    model = create_model(XLMR_ARCH)
    assert model.cfg.text == HFTextCfg(str(XLMR), pooler="mean", proj="linear")  # hf: defaults for xlm-roberta
    assert type(model.text.transformer).__name__ == "XLMRobertaModel"
    assert model.text.transformer.config._attn_implementation == "sdpa"
    keys = list(model.state_dict())
    assert not [k for k in keys if k.startswith("bert.") or "pooler" in k or k == "text_projection"]
    assert {k.split(".")[0] for k in keys} == {"logit_scale", "visual", "text"}
    assert "text.proj.weight" in keys
    clip_text = create_model(f"ViT-Tiny@hf:{CLIP_TEXT}")
    assert clip_text.cfg.text.pooler == "eos" and type(clip_text.text.transformer).__name__ == "CLIPTextModel"


@pytest.mark.parametrize("folder", [XLMR, CLIP_TEXT], ids=["xlm-roberta", "clip-text"])
@pytest.mark.parametrize(("pooler", "proj"), [("cls", "linear"), ("mean", "mlp"), ("eos", "linear")])
def test_features_do_not_depend_on_padding(folder: Path, pooler: str, proj: str) -> None:
    model = create_model(_with_text(f"ViT-Tiny@hf:{folder}", pooler=pooler, proj=proj))
    tokenizer = get_tokenizer(model.cfg)
    short = tokenizer(CAPTIONS[:2], 12)
    long = tokenizer(CAPTIONS[:2], 16)
    assert torch.equal(long[:, :12], short) and (long[:, 12:] == model.text.pad_id).all()
    with torch.no_grad():
        one = torch.cat([model.encode_text(short[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(model.encode_text(long), one, atol=1e-5, rtol=0)
    assert model.encode_text(long).shape == (2, model.cfg.embed_dim)


def test_context_beyond_the_positions_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_model(XLMR_ARCH)
    assert model.text.max_tokens == 64  # 66 positions, numbered from padding_idx + 1 = 2
    ids = get_tokenizer(model.cfg)([" ".join(["cat"] * 100)], 65)
    with pytest.raises(ValueError, match="65 tokens, but the text tower .* has positions for 64"):
        model.encode_text(ids)
    assert model.encode_text(ids[:, :64]).shape == (1, 64)
    assert create_model(f"ViT-Tiny@hf:{CLIP_TEXT}").text.max_tokens == 16
    monkeypatch.chdir(HF_TOWERS)
    assert resolve_config("ViT-Tiny@hf:tiny-xlm-roberta").name == XLMR_ARCH  # a folder is named absolutely


def test_hf_tokenizer_rows() -> None:
    tokenizer = get_tokenizer(XLMR_ARCH)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer is get_tokenizer(XLMR_ARCH)  # cached
    rows = tokenizer(CAPTIONS, 10)
    assert rows.dtype == torch.long and rows.shape == (4, 10)
    assert (rows[:, 0] == 0).all()  # <s>
    lengths = (rows != 1).sum(1)  # <pad> = 1, the config's pad_token_id
    assert [int(rows[i, n - 1]) for i, n in enumerate(lengths)] == [2] * 4  # </s> closes every row, cut or not
    assert tokenizer(CAPTIONS).shape == (4, 77)  # the tower's context_length when none is given
    spaced = tokenizer(["ein Hund läuft am Strand entlang und springt"], 30)
    assert torch.equal(spaced, tokenizer([CAPTIONS[2]], 30))  # whitespace runs collapse, as open_clip's
    assert tokenizer.normalize("Ein Hund") == "Ein Hund"  # cased vocabulary: no lower-casing
    with pytest.raises(ValueError, match="context_length"):
        tokenizer(CAPTIONS, 1)


def test_chinese_towers_keep_the_reference_wordpiece() -> None:
    """Every BERT tower (all released ones) dispatches to the WordPiece, id-identical to tokenize() and thus to the
    reference on the tokenizer fixtures."""
    import gzip

    cases = json.loads(gzip.decompress((HF_TOWERS.parent / "tokenizer_cases.json.gz").read_bytes()))
    from cn_clip.models.pretrained import PRETRAINED

    tokenizers = {get_tokenizer(name) for name in PRETRAINED} | {get_tokenizer("ViT-Tiny@BERT-Tiny-chinese")}
    assert tokenizers == {get_tokenizer()} and isinstance(get_tokenizer(), FullTokenizer)
    wordpiece = get_tokenizer("ViT-B-16@RoBERTa-wwm-ext-base-chinese")
    for group in cases["groups"].values():
        for length, rows in group["rows"].items():
            expected = torch.zeros(len(rows), int(length), dtype=torch.long)
            for i, row in enumerate(rows):
                expected[i, : len(row)] = torch.tensor(row)
            assert torch.equal(wordpiece(group["texts"], int(length)), expected)
            assert torch.equal(tokenize(group["texts"], context_length=int(length)), expected)
    assert wordpiece.normalize("“A”") == '"a"'


def test_train_save_reload_with_strict_keys(tmp_path: Path) -> None:
    argv = tiny_args(tmp_path, "--context-length", "24", steps=2, data="synthetic:8:2", batch=4)
    argv[argv.index("BERT-Tiny-chinese")] = f"hf:{XLMR}"
    summary = train(argv)
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    state = latest_state(tmp_path)
    assert any(k.startswith("module.text.transformer.") for k in state)
    model = create_model(XLMR_ARCH, tmp_path / "run" / "checkpoints" / "epoch_latest.pt")
    expected = {k.removeprefix("module."): v for k, v in state.items()}
    got = model.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    broken = dict(state)
    broken.pop("module.text.proj.weight")
    with pytest.raises(CheckpointError, match=r"missing keys: text\.proj\.weight"):
        create_model(XLMR_ARCH, {"state_dict": broken})
    with pytest.raises(CheckpointError, match="unexpected keys: text.extra"):
        create_model(XLMR_ARCH, {"state_dict": {**state, "text.extra": torch.zeros(1)}})


def test_text_weights_come_from_the_folder(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModel

    folder = tmp_path / "encoder"
    shutil.copytree(XLMR, folder)
    torch.manual_seed(5)
    pretrained = AutoModel.from_config(AutoConfig.from_pretrained(str(folder)), add_pooling_layer=False)
    pretrained.save_pretrained(str(folder))
    model = create_model(f"ViT-Tiny@hf:{folder}", text_weights=True)
    for key, value in pretrained.state_dict().items():
        assert torch.equal(model.text.transformer.state_dict()[key], value), key
    fresh = create_model(f"ViT-Tiny@hf:{folder}")  # random init unless asked
    key = "embeddings.word_embeddings.weight"
    assert not torch.equal(fresh.text.transformer.state_dict()[key], pretrained.state_dict()[key])


def test_onnx_export_parity(tmp_path: Path) -> None:
    from cn_clip.deploy import onnx_export as O

    torch.manual_seed(0)
    model = create_model(XLMR_ARCH)
    result = O.export_encoder(model, "txt", tmp_path / "xlmr", precisions=("fp32",), context_length=24)
    assert all(report.ok for report in result.reports), result.reports
    session = O.create_session(result.paths["fp32"])
    tokenizer = get_tokenizer(model.cfg)
    for length in (8, 24, 40):  # one graph for every sequence length; padding is masked inside it
        ids = tokenizer(CAPTIONS, length)
        with torch.no_grad():
            expected = model.encode_text(ids).numpy()
        np.testing.assert_allclose(O.run_session(session, ids.numpy()), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("tower", "message"),
    [
        ("hf:/nonexistent/encoder", "not a folder"),
        ("hf:no-such-org/no-such-model-xyz", "neither a local folder nor in the local Hugging Face cache"),
        ("hf:", "give a folder after 'hf:'"),
    ],
)
def test_hf_tower_errors(tower: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_model(f"ViT-Tiny@{tower}")


def test_tower_json_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cn_clip.models import registry
    from cn_clip.models.registry import add_model_config

    registry.list_towers()  # scan the built-in towers, then register the broken ones into copies
    monkeypatch.setattr(registry, "_TOWERS", dict(registry._TOWERS))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    bad = tmp_path / "bad-pooler.json"
    bad.write_text(json.dumps({"hf_model": str(XLMR), "pooler": "max"}))
    add_model_config(bad)
    with pytest.raises(ConfigError, match=r"bad-pooler\.json: pooler 'max' is not one of cls, mean, eos"):
        resolve_config("ViT-Tiny@bad-pooler")
    relative = tmp_path / "towers" / "rel.json"
    relative.parent.mkdir()
    shutil.copytree(XLMR, tmp_path / "enc")
    relative.write_text(json.dumps({"hf_model": "../enc", "proj": "none"}))
    add_model_config(relative)
    assert resolve_config("ViT-Tiny@rel").text.hf_model == str((tmp_path / "enc").resolve())
    with pytest.raises(ConfigError, match="proj 'none' needs hidden size 32 == embed_dim 64"):
        create_model("ViT-Tiny@rel")


def test_hf_towers_refuse_the_chinese_clip_hf_export(tmp_path: Path) -> None:
    from cn_clip.deploy.hf import save_hf_folder

    model = create_model(XLMR_ARCH)
    with pytest.raises(ConfigError, match="to-open-clip"):
        save_hf_folder(model.state_dict(), model.cfg, tmp_path / "out")


def test_import_stays_light() -> None:
    import subprocess
    import sys

    code = "import cn_clip, sys; cn_clip.get_tokenizer; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _read_features(path: Path) -> dict:
    return {row["text_id"]: np.array(row["feature"]) for row in map(json.loads, path.read_text().splitlines())}


def test_torch_and_onnx_extraction_tokenise_with_the_tower(tmp_path: Path) -> None:
    """extract_features (PyTorch) and pytorch_to_onnx + extract_features_onnx with an hf: tower give the features of
    the tower's own tokenizer."""
    from cn_clip.deploy.pytorch_to_onnx import main as to_onnx
    from cn_clip.eval.extract_features import main as extract
    from cn_clip.eval.extract_features_onnx import main as extract_onnx

    torch.manual_seed(3)
    model = create_model(XLMR_ARCH)
    ckpt = tmp_path / "xlmr.pt"
    torch.save({"epoch": 1, "step": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    texts = tmp_path / "valid_texts.jsonl"
    texts.write_text("".join(json.dumps({"text_id": i, "text": t}) + "\n" for i, t in enumerate(CAPTIONS)))
    common = ["--extract-text-feats", "--text-data", str(texts), "--vision-model", "ViT-Tiny"]
    common += ["--text-model", f"hf:{XLMR}", "--context-length", "24", "--num-workers", "0", "--device", "cpu"]
    torch_out, onnx_out = tmp_path / "torch.jsonl", tmp_path / "onnx.jsonl"
    argv = [*common, "--resume", str(ckpt), "--precision", "fp32", "--text-feat-output-path", str(torch_out)]
    assert extract(argv) == 0
    prefix = tmp_path / "onnx" / "xlmr"
    argv = ["--model-arch", XLMR_ARCH, "--pytorch-ckpt-path", str(ckpt), "--save-onnx-path", str(prefix)]
    assert to_onnx([*argv, "--convert-text", "--context-length", "24"]) == 0
    argv = [*common, "--onnx-text-model", f"{prefix}.txt.fp32.onnx", "--text-feat-output-path", str(onnx_out)]
    assert extract_onnx(argv) == 0
    with torch.no_grad():
        expected = model.encode_text(get_tokenizer(model.cfg)(CAPTIONS, 24))
    expected = (expected / expected.norm(dim=-1, keepdim=True)).numpy()
    for path in (torch_out, onnx_out):
        got = _read_features(path)
        np.testing.assert_allclose(np.stack([got[i] for i in range(len(CAPTIONS))]), expected, atol=1e-5, rtol=0)


def test_zero_shot_and_search_queries_tokenise_with_the_tower() -> None:
    from cn_clip.eval import zeroshot as Z
    from cn_clip.search.query import encode_query

    model = create_model(XLMR_ARCH)
    tokenizer = get_tokenizer(model.cfg)
    templates = [f"a photo of a {Z.PLACEHOLDER}.", f"ein Foto: {Z.PLACEHOLDER}"]
    with torch.no_grad():
        classifier = Z.build_classifier(
            model.encode_text, ["Cat", "猫"], templates, 24, progress=False, tokenizer=tokenizer
        )
        rows = model.encode_text(tokenizer([Z.fill(t, "Cat") for t in templates], 24))
        query = encode_query(model, {"context_length": 24}, "a photo of a Cat.", None, "cpu")
    rows = rows / rows.norm(dim=-1, keepdim=True)
    mean = rows.mean(0) / rows.mean(0).norm()
    np.testing.assert_allclose(classifier[:, 0], mean.numpy(), atol=1e-5, rtol=0)  # case kept: "Cat", not "cat"
    np.testing.assert_allclose(query[0], rows[0].numpy(), atol=1e-5, rtol=0)
