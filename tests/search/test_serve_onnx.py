"""``serve --text-onnx/--image-onnx``: queries through exported ONNX towers rank like the PyTorch towers, and a graph
that does not belong to the index's checkpoint (or is the other tower) is refused before the port opens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cn_clip.errors import ConfigError
from cn_clip.search.serve import ServeConfig, load_engine
from tests.helpers import seeded_checkpoint
from tests.search.test_serve import build

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
QUERIES = ["红色连衣裙", "一只猫在草地上", "海边的日落", "黑色运动鞋"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An index, ONNX text towers of its checkpoint (fp32, int8), and image / other-checkpoint graphs."""
    import torch

    from cn_clip.deploy import onnx_export as O
    from cn_clip.models.factory import create_model
    from tests.helpers import TINY_ARCH

    root = tmp_path_factory.mktemp("serve_onnx")
    index = build(root)
    own = create_model(TINY_ARCH)
    state = torch.load(root / "ckpt.pt", map_location="cpu", weights_only=True)["state_dict"]
    own.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    O.export_encoder(own, "txt", root / "own", precisions=("fp32", "int8"), check=False)
    O.export_encoder(own, "img", root / "own", precisions=("fp32",), check=False)
    other = create_model(TINY_ARCH)
    other_state = torch.load(seeded_checkpoint(root / "other.pt", seed=11), map_location="cpu", weights_only=True)
    other.load_state_dict({k.removeprefix("module."): v for k, v in other_state["state_dict"].items()})
    O.export_encoder(other, "txt", root / "other", precisions=("fp32",), check=False)
    paths = {name: O.onnx_path(root / "own", "txt", name) for name in ("fp32", "int8")}
    return {"index": index, **paths, "image": O.onnx_path(root / "own", "img", "fp32"),
            "other": O.onnx_path(root / "other", "txt", "fp32")}  # fmt: skip


def _hits(engine, text: str) -> tuple[list, np.ndarray]:
    vector = engine.encode_text(text).result()
    found = engine.search(engine.gallery, vector, 10, 0)
    return [engine.gallery.ids[hit.row] for hit in found], vector


def test_onnx_text_queries_rank_like_pytorch(exported: dict[str, Path]) -> None:
    torch_engine = load_engine(ServeConfig(index=str(exported["index"]), device="cpu"))
    try:
        for precision, atol in (("fp32", 1e-5), ("int8", 0.1)):
            onnx_engine = load_engine(
                ServeConfig(index=str(exported["index"]), device="cpu", text_onnx=str(exported[precision]))
            )
            try:
                for text in QUERIES:
                    ids, vector = _hits(onnx_engine, text)
                    expected_ids, expected = _hits(torch_engine, text)
                    np.testing.assert_allclose(vector, expected, atol=atol)
                    if precision == "fp32":
                        assert ids == expected_ids, text
                    else:  # int8 moves scores a little: the best hits stay
                        assert ids[0] in expected_ids[:3], text
            finally:
                onnx_engine.close()
    finally:
        torch_engine.close()


def test_onnx_image_queries_rank_like_pytorch(exported: dict[str, Path]) -> None:
    import io

    from PIL import Image

    from tests.helpers import png_bytes

    index = str(exported["index"])
    torch_engine = load_engine(ServeConfig(index=index, device="cpu"))
    onnx_engine = load_engine(ServeConfig(index=index, device="cpu", image_onnx=str(exported["image"])))
    try:
        for seed in (3, 7):
            image = Image.open(io.BytesIO(png_bytes(seed)))
            expected, actual = torch_engine.encode_image(image), onnx_engine.encode_image(image)
            np.testing.assert_allclose(actual, expected, atol=1e-5)
            hits = [h.row for h in onnx_engine.search(onnx_engine.gallery, actual, 10, 0)]
            assert hits == [h.row for h in torch_engine.search(torch_engine.gallery, expected, 10, 0)]
    finally:
        onnx_engine.close()
        torch_engine.close()


@pytest.mark.parametrize(
    ("flag", "graph", "message"),
    [
        ("text_onnx", "other", "differ from the index's checkpoint"),
        ("text_onnx", "image", "takes images; give the txt graph"),
        ("image_onnx", "fp32", "takes token ids; give the img graph"),
        ("text_onnx", "missing", "--text-onnx .*: no such file"),
    ],
)
def test_a_foreign_graph_is_refused(exported: dict[str, Path], flag: str, graph: str, message: str) -> None:
    path = exported.get(graph, exported["index"] / "missing.onnx")
    with pytest.raises(ConfigError, match=message):
        load_engine(ServeConfig(index=str(exported["index"]), device="cpu", **{flag: str(path)}))
