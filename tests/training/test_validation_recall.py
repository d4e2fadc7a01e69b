"""Validation recall goes through the evaluation's ranking (topk_search + recall_at_k): one ranking path."""

from __future__ import annotations

import pytest
import torch

from cn_clip.training.loop import pair_recall


def _brute_force_hits(queries: torch.Tensor, gallery: torch.Tensor, truth: list[set[int]], k: int) -> int:
    """Count queries with a true item among the k highest scores (no ties in random features)."""
    top = (queries @ gallery.t()).argsort(dim=1, descending=True)[:, :k]
    return sum(bool(truth[q] & set(top[q].tolist())) for q in range(len(queries)))


@pytest.mark.parametrize("seed", range(4))
def test_pair_recall_counts_hits_like_a_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_images, n_pairs = 17, 40
    image_rows = torch.nn.functional.normalize(torch.randn(n_images, 8, generator=g), dim=-1)
    image_keys = torch.cat([torch.arange(n_images), torch.randint(0, n_images, (n_pairs - n_images,), generator=g)])
    text_keys = 100 + torch.arange(n_pairs)
    text_keys[torch.randint(0, n_pairs, (6,), generator=g)] = 100  # a text paired with several images
    text = torch.nn.functional.normalize(torch.randn(n_pairs, 8, generator=g), dim=-1)
    image = image_rows[image_keys]  # pairs repeat an image's features

    recalls = pair_recall(image, text, image_keys, text_keys)

    texts = list(dict.fromkeys(text_keys.tolist()))
    first_text = torch.tensor([text_keys.tolist().index(t) for t in texts])
    t2i_truth = [{int(i) for i, t in zip(image_keys, text_keys, strict=True) if int(t) == key} for key in texts]
    i2t_truth = [{texts.index(int(t)) for i, t in zip(image_keys, text_keys, strict=True) if int(i) == img}
                 for img in range(n_images)]  # fmt: skip
    assert (recalls["num_texts"], recalls["num_images"]) == (len(texts), n_images)
    for k in (1, 5, 10):
        t2i = _brute_force_hits(text[first_text], image_rows, t2i_truth, k)
        i2t = _brute_force_hits(image_rows, text[first_text], i2t_truth, k)
        assert recalls[f"t2i_r{k}"] == pytest.approx(100 * t2i / len(texts), abs=1e-9)
        assert recalls[f"i2t_r{k}"] == pytest.approx(100 * i2t / n_images, abs=1e-9)
    six = [recalls[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]
    assert recalls["mean_recall"] == pytest.approx(sum(six) / 6)


def test_validation_recall_equals_evaluation_on_the_same_features() -> None:
    from cn_clip.eval.featio import Features
    from cn_clip.eval.topk import evaluate_retrieval

    g = torch.Generator().manual_seed(7)
    image = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=-1)
    keys = torch.arange(12)
    recalls = pair_recall(image, text, keys, keys + 50)
    expected = evaluate_retrieval(
        Features(keys.tolist(), image.numpy(), "image_id"),
        Features((keys + 50).tolist(), text.numpy(), "text_id"),
        {t + 50: [t] for t in range(12)},
    )
    for short, name in (("t2i", "text_to_image"), ("i2t", "image_to_text")):
        for k in (1, 5, 10):
            assert recalls[f"{short}_r{k}"] == expected[name][f"r{k}"]
