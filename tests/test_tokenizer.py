"""cn_clip.tokenizer: id-for-id parity with the reference cn-clip 1.6.0 tokenizer (fixtures in tests/fixtures)."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import subprocess
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip import tokenizer as tk

FIXTURES = Path(__file__).parent / "fixtures"
VOCAB_SHA256 = "45bbac6b341c319adc98a532532882e91a9cefc0329aa57bac9ae761c27b291c"


@lru_cache(maxsize=1)
def cases() -> dict:
    return json.loads(gzip.decompress((FIXTURES / "tokenizer_cases.json.gz").read_bytes()))


@lru_cache(maxsize=1)
def codepoint_table() -> tuple[np.ndarray, np.ndarray]:
    """(offsets, ids): reference ids of "a" + chr(cp) + "a" are ids[offsets[cp]:offsets[cp + 1]]."""
    data = np.load(FIXTURES / "tokenizer_codepoints.npz")
    assert str(data["probe"]) == "a{}a"
    offsets = np.concatenate([[0], np.cumsum(data["lengths"].astype(np.int64))])
    return offsets, data["ids"].astype(np.int64)


def reference_probe_ids(cps: list[int]) -> list[list[int]]:
    offsets, ids = codepoint_table()
    return [ids[offsets[cp] : offsets[cp + 1]].tolist() for cp in cps]


def padded(rows: list[list[int]], context_length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), context_length, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


GROUP_CONTEXTS = [(name, int(n)) for name, group in cases()["groups"].items() for n in group["rows"]]


# --------------------------------------------------------------------------------------------------------------------
# Parity with the reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize(("group", "context_length"), GROUP_CONTEXTS, ids=[f"{g}-{n}" for g, n in GROUP_CONTEXTS])
def test_tokenize_matches_reference(group: str, context_length: int) -> None:
    data = cases()["groups"][group]
    expected = padded(data["rows"][str(context_length)], context_length)
    got = tk.tokenize(data["texts"], context_length=context_length)
    assert got.dtype == torch.long and got.shape == expected.shape
    mismatched = [data["texts"][i][:40] for i in torch.nonzero((got != expected).any(dim=1)).flatten().tolist()]
    assert not mismatched, f"{len(mismatched)} texts differ from the reference, e.g. {mismatched[:5]!r}"


@pytest.mark.parity
def test_each_back_end_matches_reference_on_all_fixture_texts() -> None:
    """The Python back end, the per-character lane and the Rust back end each reproduce the reference alone."""
    python_only = tk.FullTokenizer(use_fast=False)
    lanes = tk.FullTokenizer()
    rust = lanes._fast_path()
    assert rust is not None
    checked = {"python": 0, "solo": 0, "rust": 0}
    for group in cases()["groups"].values():
        for text, row in zip(group["texts"], group["rows"]["52"], strict=True):
            expected = row[1:-1]
            assert python_only.encode(text)[:50] == expected, text
            checked["python"] += 1
            solo = lanes._solo_ids(text)
            if solo is not None:
                assert solo[:50] == expected, text
                checked["solo"] += 1
            if rust.accepts(text):
                assert rust.encode_batch([text])[0][:50] == expected, text
                checked["rust"] += 1
    assert checked["solo"] > 3000 and checked["rust"] > 5000, checked


@pytest.mark.parity
def test_python_back_end_matches_reference_on_every_bmp_code_point() -> None:
    cps = list(range(0x10000))
    python_only = tk.FullTokenizer(use_fast=False)
    got = [python_only.encode("a" + chr(cp) + "a") for cp in cps]
    bad = [hex(cp) for cp, g, e in zip(cps, got, reference_probe_ids(cps), strict=True) if g != e]
    assert not bad, f"{len(bad)} code points differ: {bad[:20]}"


@pytest.mark.parity
def test_batched_lanes_match_reference_on_sampled_code_points() -> None:
    """A fresh tokenizer must route every code point correctly (Rust, per-character lane or Python)."""
    cps = list(range(0, 0x10000, 7)) + list(range(0x10000, 0x110000, 211)) + [0x3A3, 0xE000, 0xD800, 0x2B820]
    got = tk.FullTokenizer().encode_batch(["a" + chr(cp) + "a" for cp in cps] + [chr(cp) for cp in cps])
    probes, alone = got[: len(cps)], got[len(cps) :]
    bad = [hex(cp) for cp, g, e in zip(cps, probes, reference_probe_ids(cps), strict=True) if g != e]
    assert not bad, f"{len(bad)} code points differ: {bad[:20]}"
    python_only = tk.FullTokenizer(use_fast=False)
    assert alone == [python_only.encode(chr(cp)) for cp in cps]


@pytest.mark.slow
@pytest.mark.parity
def test_all_code_points_both_back_ends() -> None:
    cps = list(range(0x110000))
    expected = reference_probe_ids(cps)
    texts = ["a" + chr(cp) + "a" for cp in cps]
    python_only = tk.FullTokenizer(use_fast=False)
    for name, got in (
        ("python", [python_only.encode(t) for t in texts]),
        ("batched", tk.FullTokenizer().encode_batch(texts)),
    ):
        bad = [hex(cp) for cp, g, e in zip(cps, got, expected, strict=True) if g != e]
        assert not bad, f"{name}: {len(bad)} code points differ: {bad[:20]}"


def test_random_mixtures_agree_across_back_ends() -> None:
    """Texts mixing CJK, Latin, digits, punctuation, marks, Σ, private-use and spacing: every lane = Python."""
    pool = list("猫狗的照片一张，。！？、“”（）《》abcXYZéÉüÜ013 \t\n-_.'\"") + [
        "\u0301",
        "\u0308",
        "\u03a3",
        "\u03c3",
        "\ue000",
        "\u200d",
        "\u3000",
        "\x00",
        "\ufffd",
        "\U00020000",
        "\U0001f600",
        "ｆ",
        "Ａ",
        "１",
        "ﬁ",
        "İ",
        "\U0001d165",
        "\u0f73",
    ]
    rng = random.Random(7)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    texts += ["".join(rng.choice(pool[:16]) for _ in range(rng.randint(1, 20))) for _ in range(1000)]
    python_only = tk.FullTokenizer(use_fast=False)
    assert tk.FullTokenizer().encode_batch(texts) == [python_only.encode(t) for t in texts]


@pytest.mark.parametrize(
    "text",
    [
        "ΑΣ.Β ΑΣ. Σ",  # final sigma looks across case-ignorable punctuation: routed to Python
        "a.\u0301b c,\u0903d",  # marks right after a boundary
        "a\x1c.b\x00,c",  # dropped characters next to boundaries join their run
        "x\u2028y,z\u00a0w",  # non-ASCII whitespace stays inside runs
        "Café,CAFÉ.café",
        "ǅ!ǈ?İ;",
        "iPhone13手机壳 iPhone13",
        "\ue000a.b\ue000",  # private use inside runs: Python, not Rust
        "b" * 199 + "." + "c" * 201,  # the 200-character limit applies per word
    ],
)
def test_segmented_lane_matches_python(text: str) -> None:
    python_only = tk.FullTokenizer(use_fast=False)
    assert tk.FullTokenizer().encode_batch([text, text]) == [python_only.encode(text)] * 2


def test_run_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "_RUN_MEMO_SIZE", 8)
    tokenizer = tk.FullTokenizer()
    texts = [f"word{i}, more{i}" for i in range(20)]
    python_only = tk.FullTokenizer(use_fast=False)
    for start in range(0, 20, 4):
        assert tokenizer.encode_batch(texts[start : start + 4]) == [python_only.encode(t) for t in texts[start:][:4]]
        assert len(tokenizer._runs) <= 8


# --------------------------------------------------------------------------------------------------------------------
# Documented examples and API
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("杰尼龟", ["杰", "尼", "龟"]),
        ("Hello, World! Café", ["hello", ",", "world", "!", "cafe"]),
        ("iPhone13手机壳", ["iphone", "##13", "手", "机", "壳"]),
        ("一张“猫”的照片", ["一", "张", "[UNK]", "猫", "[UNK]", "的", "照", "片"]),
        ("ＡＢＣ１２３", ["ａ", "##ｂ", "##ｃ", "##１", "##２", "##３"]),  # lower-cased, no NFKC
        ("a\x00b\u200dc", ["abc"]),
        ("ΟΔΟΣ", ["ο", "##δ", "##ο", "##ς"]),  # final sigma, as Python's str.lower()
        ("", []),
        ("b" * 201, ["[UNK]"]),
    ],
)
def test_spec_examples(text: str, tokens: list[str]) -> None:
    assert tk.get_tokenizer().tokenize(text) == tokens


def test_spec_ids_and_padding() -> None:
    row = tk.tokenize("杰尼龟")
    assert row.shape == (1, 52) and row.dtype == torch.long
    assert row[0, :6].tolist() == [101, 3345, 2225, 7991, 102, 0]
    assert row[0, 5:].eq(0).all()
    assert tk.tokenize("Hello, World! Café")[0, 1:6].tolist() == [8701, 117, 8572, 106, 8377]


def test_truncation_keeps_sep() -> None:
    row = tk.tokenize("猫" * 100, context_length=10)[0].tolist()
    assert row[0] == 101 and row[-1] == 102 and len(row) == 10
    assert tk.tokenize("猫", context_length=2).tolist() == [[101, 102]]
    assert tk.tokenize("猫" * 600, context_length=512).shape == (1, 512)
    # beyond 512 as in the reference (no cap): the model checks its own position limit (models/positions.py)
    long = tk.tokenize("猫" * 600, context_length=700)[0]
    assert long[:511].tolist() == tk.tokenize("猫" * 600, context_length=512)[0, :511].tolist()
    assert int((long != 0).sum()) == 602


@pytest.mark.parametrize("bad", [0, 1, -5, 52.0, True, "52", None])
def test_context_length_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="context_length"):
        tk.tokenize("猫", context_length=bad)  # type: ignore[arg-type]


def test_input_kinds() -> None:
    single = tk.tokenize("一只猫")
    assert torch.equal(tk.tokenize(["一只猫"]), single)
    assert torch.equal(tk.tokenize(("一只猫",)), single)
    assert torch.equal(tk.tokenize("一只猫".encode()), single)
    assert torch.equal(tk.tokenize(["一只猫".encode() + b"\xff"]), single)  # undecodable bytes dropped
    assert tk.tokenize([]).shape == (0, 52)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tk.tokenize(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="texts must be"):
        tk.tokenize(5)  # type: ignore[arg-type]


def test_truncation_warning(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tk, "_truncation_warned", False)
    texts = ["短", "长" * 60]
    with caplog.at_level(logging.WARNING, logger="cn_clip.tokenizer"):
        tk.tokenize(texts, context_length=52, warn_truncation=False)
        tk.tokenize(texts, context_length=100)  # nothing cut: no warning, the once is not used up
        assert not caplog.records
        first = tk.tokenize(texts, context_length=52)  # default: warns once per process
        again = tk.tokenize(texts, context_length=52)
        assert len(caplog.records) == 1 and "warned once" in caplog.records[0].getMessage()
        tk.tokenize(texts, context_length=52, warn_truncation=True)
    silent = tk.tokenize(texts, context_length=52, warn_truncation=False)
    assert torch.equal(first, again) and torch.equal(first, silent)
    assert len(caplog.records) == 2
    message = caplog.records[1].getMessage()
    assert "1 of 2 texts" in message and "#1 (62 tokens)" in message and "warned once" not in message


def test_normalize_text() -> None:
    assert tk.normalize_text("一张“猫”的照片 ABC") == '一张"猫"的照片 abc'
    ids = tk.tokenize(tk.normalize_text("一张“猫”的照片"))[0].tolist()
    assert 107 in ids and 100 not in ids  # ASCII " is id 107 in the vocabulary
    assert 100 in tk.tokenize("一张“猫”的照片")[0].tolist()  # tokenize() itself does not normalise


def test_full_tokenizer_api() -> None:
    tok = tk.get_tokenizer()
    assert tok is tk.get_tokenizer()
    assert tok.vocab_size() == len(tok.vocab) == len(tok.inv_vocab) == 21128
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.convert_tokens_to_ids(specials) == [0, 100, 101, 102, 103]
    assert tok.convert_ids_to_tokens([101, 3345, 102]) == ["[CLS]", "杰", "[SEP]"]
    with pytest.raises(KeyError):
        tok.convert_tokens_to_ids(["“"])
    assert tok.convert_tokens_to_string(["iphone", "##13", "is", "great", "!"]) == "iphone13 is great!"
    assert tok.convert_tokens_to_string(["a", "##b", "."], clean_up_tokenization_spaces=False) == "ab ."
    assert "FullTokenizer(" in repr(tok)


def test_compat_shim_and_custom_vocab(tmp_path: Path) -> None:
    from cn_clip.clip.bert_tokenizer import FullTokenizer, default_vocab

    assert FullTokenizer is tk.FullTokenizer
    assert Path(default_vocab()) == tk.VOCAB_PATH
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n##s\n", encoding="utf-8")
    small = FullTokenizer(vocab_file=str(vocab))
    assert small.tokenize("Hellos world") == ["hello", "##s", "[UNK]"]
    assert small.encode_batch(["Hellos world", "hello"]) == [[4, 5, 1], [4]]
    cased = FullTokenizer(do_lower_case=False)
    assert cased.tokenize("Café ABC 猫") == ["[UNK]", "[UNK]", "猫"]  # reference FullTokenizer(do_lower_case=False)
    assert cased.encode_batch(["Café ABC 猫", "Café ABC"]) == [[100, 100, 4344], [100, 100]]


def test_shipped_vocab_is_byte_identical() -> None:
    assert hashlib.sha256(tk.VOCAB_PATH.read_bytes()).hexdigest() == VOCAB_SHA256


def test_import_is_lazy() -> None:
    code = (
        "import sys, cn_clip.tokenizer, cn_clip.clip.bert_tokenizer\n"
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert cn_clip.tokenizer._wordpiece.cache_info().currsize == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unicode_version_matches_fixture() -> None:
    """The reference's ids depend on the interpreter's Unicode tables; the fixtures came from Python 3.11."""
    if unicodedata.unidata_version != "14.0.0":
        pytest.skip(f"fixtures made with Unicode 14.0.0 (Python 3.11), running {unicodedata.unidata_version}")
    assert cases()["python"].startswith("3.11")
