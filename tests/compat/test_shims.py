"""The reference's compatibility entry points (``cn_clip.clip.*``) mean what they meant there, or say why not.

Golden values: ``tests/fixtures/gen_shim_fixtures.py`` run on the reference (see ``tests/fixtures/README.md``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip.errors import ConfigError
from tests.conftest import TINY_ARCH

SHIMS = Path(__file__).resolve().parents[1] / "fixtures" / "shims"
BERT_GOLDEN = json.loads((SHIMS / "bert_config.json").read_text())
BERT_CASES = BERT_GOLDEN["calls"]


def test_bert_config_positional_order_is_the_reference() -> None:
    from cn_clip.clip.configuration_bert import REFERENCE_POSITIONAL

    assert ["vocab_size_or_config_json_file", *REFERENCE_POSITIONAL] == BERT_GOLDEN["signature"]


@pytest.mark.parametrize("case", BERT_CASES, ids=[f"call{i}" for i in range(len(BERT_CASES))])
def test_bert_config_maps_the_reference_arguments(case: dict) -> None:
    from cn_clip.clip.configuration_bert import BertConfig

    config = BertConfig(*case["args"], **case["kwargs"])
    assert {name: getattr(config, name) for name in case["fields"]} == case["fields"]
    assert not hasattr(config, "vocab_size_or_config_json_file")


def test_bert_config_builds_the_transformers_model_it_describes() -> None:
    import transformers

    from cn_clip.clip.configuration_bert import BertConfig

    config = BertConfig(vocab_size_or_config_json_file=21128, hidden_size=32, num_hidden_layers=1)
    assert isinstance(config, transformers.BertConfig)
    model = transformers.BertModel(BertConfig(21128, 32, 1, 2, 64))
    assert model.embeddings.word_embeddings.weight.shape == (21128, 32)
    assert BertConfig.from_dict(config.to_dict()).vocab_size == 21128  # transformers' own round trip


def test_bert_config_reads_a_json_path(tmp_path: Path) -> None:
    from cn_clip.clip.configuration_bert import BertConfig

    path = tmp_path / "bert_config.json"
    path.write_text(json.dumps({"vocab_size": 21128, "hidden_size": 312, "num_hidden_layers": 3}))
    config = BertConfig(path)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (21128, 312, 3)
    assert BertConfig(str(path), num_attention_heads=4).num_attention_heads == 4


def test_bert_config_refuses_what_it_cannot_map(tmp_path: Path) -> None:
    from cn_clip.clip.configuration_bert import BertConfig

    path = tmp_path / "c.json"
    path.write_text('{"hidden_size": 312}')
    with pytest.raises(TypeError, match="hidden_size"):
        BertConfig(path, hidden_size=64)  # both: neither silently wins
    with pytest.raises(TypeError, match="vocab_size"):
        BertConfig(21128, vocab_size=30522)
    with pytest.raises(TypeError, match="multiple values"):
        BertConfig(21128, 64, hidden_size=32)
    with pytest.raises(TypeError, match="int or a JSON path"):
        BertConfig(21128.0)
    with pytest.raises(TypeError, match="at most"):
        BertConfig(*range(17))
    with pytest.raises(ConfigError, match="does not exist"):
        BertConfig(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ConfigError, match="not an object"):
        BertConfig(tmp_path / "list.json")


def test_bert_config_flash_attention_warns_and_is_kept() -> None:
    from cn_clip.clip.configuration_bert import BertConfig

    with pytest.warns(UserWarning, match="SDPA"):
        config = BertConfig(21128, use_flash_attention=True)
    assert config.use_flash_attention is True


def _resize_golden() -> dict[str, np.ndarray]:
    with np.load(SHIMS / "resize_pos_embed.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def grid4_model():
    """ViT-Tiny (64 px, patch 16): a 4×4 grid, 17 positions of width 64; the golden grid is 3×3 of width 8."""
    from cn_clip.models.factory import create_model

    model = create_model(TINY_ARCH)
    width = 8
    model.visual.positional_embedding = torch.nn.Parameter(torch.zeros(17, width))
    return model


@pytest.mark.parametrize(
    ("name", "kwargs", "prefix"),
    [
        ("bicubic", {}, ""),
        ("bilinear", {"interpolation": "bilinear"}, ""),
        ("prefixed", {"prefix": "module."}, "module."),
    ],
)
def test_resize_pos_embed_matches_the_reference(grid4_model, name: str, kwargs: dict, prefix: str) -> None:
    from cn_clip.clip.model import resize_pos_embed

    golden = _resize_golden()
    key = f"{prefix}visual.positional_embedding"
    state = {key: torch.from_numpy(golden["stored"]), f"{prefix}logit_scale": torch.tensor(1.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resize_pos_embed(state, grid4_model, **kwargs)
    np.testing.assert_allclose(state[key].numpy(), golden[name], atol=1e-6)
    assert set(state) == {key, f"{prefix}logit_scale"}


def test_resize_pos_embed_unwraps_a_ddp_style_module(grid4_model) -> None:
    from types import SimpleNamespace

    from cn_clip.clip.model import resize_pos_embed

    golden = _resize_golden()
    state = {"module.visual.positional_embedding": torch.from_numpy(golden["stored"])}
    resize_pos_embed(state, SimpleNamespace(module=grid4_model), prefix="module.")
    np.testing.assert_allclose(state["module.visual.positional_embedding"].numpy(), golden["prefixed"], atol=1e-6)


def test_resize_pos_embed_seq_dim_warns_and_changes_nothing(grid4_model) -> None:
    from cn_clip.clip.model import resize_pos_embed

    golden = _resize_golden()
    state = {"visual.positional_embedding": torch.from_numpy(golden["stored"])}
    with pytest.warns(UserWarning, match="seq_dim=0"):
        resize_pos_embed(state, grid4_model, seq_dim=0)
    np.testing.assert_allclose(state["visual.positional_embedding"].numpy(), golden["seq_dim0"], atol=1e-6)
    np.testing.assert_array_equal(golden["seq_dim0"], golden["bicubic"])  # the reference ignores it too


def test_resize_pos_embed_refuses_an_unusable_mode(grid4_model) -> None:
    from cn_clip.clip.model import resize_pos_embed

    with pytest.raises(ValueError, match="interpolation must be one of"):
        resize_pos_embed({}, grid4_model, interpolation="nearest")


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    from cn_clip.models.factory import create_model

    torch.manual_seed(3)
    return {
        k: torch.randn_like(v) if v.is_floating_point() else v for k, v in create_model(TINY_ARCH).state_dict().items()
    }


def test_restore_model_either_layout_and_flag(tiny_state: dict) -> None:
    from cn_clip.clip.model import restore_model
    from cn_clip.models.factory import create_model
    from cn_clip.weights import to_flash_layout

    clip_part = {k: v for k, v in tiny_state.items() if k.startswith(("visual", "logit"))}
    bert_part = {k: v for k, v in tiny_state.items() if k.startswith("bert")}
    plain = restore_model(create_model(TINY_ARCH), clip_part, bert_part)
    with pytest.warns(UserWarning, match="restore_model\\(use_flash_attention=True\\).*SDPA"):
        flash = restore_model(create_model(TINY_ARCH), to_flash_layout(clip_part), to_flash_layout(bert_part), True)
    for key in [*clip_part, *bert_part]:
        assert torch.equal(plain.state_dict()[key], tiny_state[key])
        assert torch.equal(flash.state_dict()[key], tiny_state[key])


def test_create_model_and_load_warn_on_flash_attention(tiny_state: dict, tmp_path: Path) -> None:
    import cn_clip.clip as clip
    from cn_clip.clip.utils import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_model(TINY_ARCH, {"state_dict": tiny_state})  # the default: silent
    with pytest.warns(UserWarning, match="create_model\\(use_flash_attention=True\\)"):
        model = create_model(TINY_ARCH, {"state_dict": tiny_state}, use_flash_attention=True)
    assert torch.equal(model.state_dict()["text_projection"], tiny_state["text_projection"])
    bert_path = tmp_path / "bert.pt"
    torch.save({k: v for k, v in tiny_state.items() if k.startswith("bert")}, bert_path)
    with pytest.warns(UserWarning, match="load\\(use_flash_attention=True\\)"):
        loaded = clip.load(create_model(TINY_ARCH), "cpu", bert_path=str(bert_path), use_flash_attention=True)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(loaded.state_dict()[key], tiny_state[key])


def test_training_flag_logs_that_sdpa_already_selects_flash(tmp_path: Path) -> None:
    from tests.training.helpers import tiny_args, train

    train(tiny_args(tmp_path, "--use-flash-attention", steps=1))
    (log,) = (tmp_path / "run").glob("out_*.log")
    line = next(line for line in log.read_text(encoding="utf-8").splitlines() if "Using FlashAttention" in line)
    assert "SDPA" in line and "selects the FlashAttention kernel on a GPU" in line
