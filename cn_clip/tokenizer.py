"""Chinese BERT WordPiece tokenizer, id-for-id identical to the reference ``cn_clip.clip.tokenize``.

Two back ends produce the same ids:

* a pure-Python BasicTokenizer + WordPiece (:class:`BasicTokenizer`, :class:`WordpieceTokenizer`), the ground truth,
  written to follow the reference algorithm step by step (compatibility.md#tokenizer);
* a Rust ``tokenizers`` pipeline (BertNormalizer + BertPreTokenizer + WordPiece with the reference's 200-character
  word limit).

They differ on a few characters (private-use code points, which Rust drops and the reference keeps; context-dependent
lower-casing of a final ``Σ``; characters whose Unicode data is older in Rust; CJK Extension E+). Rust is therefore
used only for text whose every character has been checked: each new character is probed once through both back
ends and admitted only if both split and normalise it identically (:class:`_FastPath`).

:meth:`FullTokenizer.encode_batch` (used by :func:`tokenize`) adds two exact shortcuts in front: per-character
lookup for text made only of characters that tokenise the same wherever they stand (CJK, punctuation, whitespace),
and, for other text, splitting at characters that always end a word and memoising the runs between them.

Nothing is built at import time: :func:`get_tokenizer` builds the tokenizer on first use and caches it. This module
imports neither torch, numpy, tokenizers nor transformers at module level.
"""

from __future__ import annotations

import functools
import html
import itertools
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

VOCAB_PATH = Path(__file__).with_name("vocab.txt")
DEFAULT_CONTEXT_LENGTH = 52
MAX_CONTEXT_LENGTH = 512  # position embeddings of every released text tower (models/positions.py checks a model's)
MAX_INPUT_CHARS_PER_WORD = 200  # longer words become one [UNK]

PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"

# Code point ranges that the reference surrounds with spaces (each becomes its own word).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
_KEPT_CONTROLS = "\t\n\r"  # control characters that count as whitespace, not as garbage
_CURLY_QUOTES = {"\u201c": '"', "\u201d": '"'}
_CURLY_QUOTE_TABLE = str.maketrans(_CURLY_QUOTES)
_RUN_MEMO_SIZE = 1 << 17  # memoised runs per tokenizer before the memo is reset


def _segment_pattern() -> re.Pattern[str]:
    """Characters that end a word wherever they stand: ASCII whitespace, ASCII punctuation and CJK characters.

    Splitting a text at these (and keeping them) lets the pieces between them be tokenised independently: spaces
    and CJK characters separate the reference's whitespace tokens, and ASCII punctuation is a starter that is
    always cut off, so lower-casing (except ``Σ``), NFD and accent stripping never act across it.
    """
    ascii_punctuation = "".join(chr(cp) for cp in range(33, 127) if not chr(cp).isalnum())
    cjk = "".join(f"{chr(low)}-{chr(high)}" for low, high in _CJK_RANGES)
    return re.compile(f"([ \\t\\n\\r{re.escape(ascii_punctuation)}{cjk}])")


_SEGMENT_RE = _segment_pattern()


# --------------------------------------------------------------------------------------------------------------------
# Character classes (compatibility.md#tokenizer)
# --------------------------------------------------------------------------------------------------------------------


def is_cjk_char(char: str) -> bool:
    """True for code points that the reference tokenises as a word of their own."""
    cp = ord(char)
    return any(low <= cp <= high for low, high in _CJK_RANGES)


def is_whitespace_char(char: str) -> bool:
    """Space, tab, newline, carriage return and Unicode space separators (Zs)."""
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def is_control_char(char: str) -> bool:
    """Control (Cc) and format (Cf) characters, except tab/newline/carriage return."""
    return char not in _KEPT_CONTROLS and unicodedata.category(char) in ("Cc", "Cf")


def is_punctuation_char(char: str) -> bool:
    """Every non-alphanumeric printable ASCII character, and Unicode punctuation (P*)."""
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def to_unicode(text: str | bytes) -> str:
    """Return ``text`` as ``str``; bytes are decoded as UTF-8 with undecodable bytes dropped (as the reference)."""
    if isinstance(text, str):
        return text
    if isinstance(text, bytes | bytearray):
        return bytes(text).decode("utf-8", "ignore")
    raise TypeError(f"expected str or bytes, got {type(text).__name__}: {text!r:.80}")


# --------------------------------------------------------------------------------------------------------------------
# Pure-Python back end
# --------------------------------------------------------------------------------------------------------------------


class BasicTokenizer:
    """Cleaning, CJK splitting, lower-casing, accent stripping and punctuation splitting."""

    def __init__(self, do_lower_case: bool = True) -> None:
        self.do_lower_case = do_lower_case

    def tokenize(self, text: str | bytes) -> list[str]:
        """Split ``text`` into the words that WordPiece sees."""
        words: list[str] = []
        for word in self._spaced(to_unicode(text)).split():
            if self.do_lower_case:
                word = strip_accents(word.lower())
            words.extend(split_on_punctuation(word))
        # Lower-casing or NFD never yields whitespace today; splitting again keeps the reference's exact steps.
        return " ".join(words).split()

    @staticmethod
    def _spaced(text: str) -> str:
        """Drop NUL, U+FFFD and control characters, turn whitespace into spaces, put spaces around CJK characters."""
        out: list[str] = []
        for char in text:
            if char in ("\x00", "\ufffd") or is_control_char(char):
                continue
            if is_whitespace_char(char):
                out.append(" ")
            elif is_cjk_char(char):
                out.append(f" {char} ")
            else:
                out.append(char)
        return "".join(out)


def strip_accents(text: str) -> str:
    """NFD-decompose ``text`` and drop nonspacing marks (Mn)."""
    return "".join(char for char in unicodedata.normalize("NFD", text) if unicodedata.category(char) != "Mn")


def split_on_punctuation(word: str) -> list[str]:
    """Cut ``word`` before and after every punctuation character; punctuation becomes a word of its own."""
    pieces: list[str] = []
    current: list[str] = []
    for char in word:
        if is_punctuation_char(char):
            if current:
                pieces.append("".join(current))
                current = []
            pieces.append(char)
        else:
            current.append(char)
    if current:
        pieces.append("".join(current))
    return pieces


class WordpieceTokenizer:
    """Greedy longest-match-first WordPiece with ``##`` continuation pieces; one ``[UNK]`` per unmatched word."""

    def __init__(
        self,
        vocab: dict[str, int],
        unk_token: str = UNK_TOKEN,
        max_input_chars_per_word: int = MAX_INPUT_CHARS_PER_WORD,
    ) -> None:
        self.vocab = vocab
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word
        # No vocabulary entry is longer than this, so longer candidates need not be looked up.
        self._longest = max((len(token) for token in vocab), default=0)

    def tokenize(self, text: str) -> list[str]:
        """WordPiece every whitespace-separated word of ``text``."""
        pieces: list[str] = []
        for word in text.split():
            pieces.extend(self.tokenize_word(word))
        return pieces

    def tokenize_word(self, word: str) -> list[str]:
        """WordPiece one word (no whitespace inside)."""
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_token]
        pieces: list[str] = []
        start = 0
        while start < len(word):
            prefix = "##" if start else ""
            end = min(len(word), start + self._longest - len(prefix))
            while end > start:
                candidate = prefix + word[start:end]
                if candidate in self.vocab:
                    pieces.append(candidate)
                    break
                end -= 1
            else:
                return [self.unk_token]
            start = end
        return pieces


def load_vocab(vocab_file: str | Path = VOCAB_PATH) -> dict[str, int]:
    """Read a BERT vocabulary: one token per line, id = 0-based line number, surrounding whitespace stripped."""
    vocab: dict[str, int] = {}
    with open(vocab_file, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            vocab[line.strip()] = index
    return vocab


# --------------------------------------------------------------------------------------------------------------------
# Rust fast path
# --------------------------------------------------------------------------------------------------------------------

_GREEK_CAPITAL_SIGMA = "\u03a3"  # Python lower-cases it by context (final ς), Rust never does


def _context_sensitive(char: str) -> bool:
    """Characters whose result can depend on their neighbours, so that probing them alone proves nothing."""
    category = unicodedata.category(char)
    if char == _GREEK_CAPITAL_SIGMA or category in ("Cn", "Cs"):
        # Unassigned code points may be assigned (with other properties) in Rust's newer Unicode tables.
        # Lone surrogates cannot cross into Rust at all.
        return True
    # A spacing mark with a nonzero combining class survives accent stripping and may be reordered by NFD,
    # which the reference applies per word after lower-casing and Rust applies to the whole text before it.
    forms = unicodedata.normalize("NFD", char) + unicodedata.normalize("NFD", char.lower())
    return any(unicodedata.combining(c) and unicodedata.category(c) != "Mn" for c in forms)


class _FastPath:
    """A ``tokenizers.Tokenizer`` plus the set of characters proven to tokenise identically through it."""

    _PROBE_CONTEXTS = ("{}", "a{}a", "{}1")

    def __init__(self, vocab: dict[str, int], basic: BasicTokenizer) -> None:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

        model = models.WordPiece(vocab, unk_token=UNK_TOKEN, max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
        self.tokenizer = Tokenizer(model)
        self.tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=True,
            strip_accents=basic.do_lower_case,
            lowercase=basic.do_lower_case,
        )
        self.tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._basic = basic
        self.safe: set[str] = set()
        self.unsafe: set[str] = set()

    def _rust_words(self, text: str) -> list[str]:
        normalized = self.tokenizer.normalizer.normalize_str(text)
        return [word for word, _ in self.tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]

    def _probe(self, char: str) -> bool:
        """True when both back ends produce the same words for ``char`` alone and between ASCII neighbours."""
        if _context_sensitive(char):
            return False
        for context in self._PROBE_CONTEXTS:
            text = context.format(char)
            if self._rust_words(text) != self._basic.tokenize(text):
                return False
        return True

    def accepts(self, text: str) -> bool:
        """True when every character of ``text`` is proven safe for the Rust back end."""
        if self.safe.issuperset(text):
            return True
        for char in set(text).difference(self.safe):
            if char in self.unsafe:
                return False
            (self.safe if self._probe(char) else self.unsafe).add(char)
            if char in self.unsafe:
                return False
        return True

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids (no special tokens) of texts that passed :meth:`accepts`."""
        if len(texts) == 1:
            return [self.tokenizer.encode(texts[0], add_special_tokens=False).ids]
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


# --------------------------------------------------------------------------------------------------------------------
# Public tokenizer
# --------------------------------------------------------------------------------------------------------------------


class FullTokenizer:
    """Drop-in for the reference ``cn_clip.clip.bert_tokenizer.FullTokenizer`` (same attributes and methods).

    ``tokenize``/``encode`` use the pure-Python back end; :meth:`encode_batch` (used by :func:`tokenize`) takes the
    fastest exact lane per text. ``use_fast=False`` keeps Rust out (the shortcuts stay: they are pure Python).
    """

    pad_id = 0  # [PAD]

    def __init__(self, vocab_file: str | Path | None = None, do_lower_case: bool = True, use_fast: bool = True) -> None:
        self.vocab_file = Path(vocab_file) if vocab_file is not None else VOCAB_PATH
        self.vocab = load_vocab(self.vocab_file)
        self.inv_vocab = {index: token for token, index in self.vocab.items()}
        self.basic_tokenizer = BasicTokenizer(do_lower_case=do_lower_case)
        self.wordpiece_tokenizer = WordpieceTokenizer(vocab=self.vocab)
        self.use_fast = use_fast
        self._fast: _FastPath | None = None
        self._solo: dict[str, tuple[int, ...] | None] = {}  # per-character ids, None = not a solo character
        self._solo_chars: set[str] = set()  # keys of _solo whose value is not None
        self._runs: dict[str, list[int]] = {}  # memo of text runs between word boundaries (see encode_batch)

    def __repr__(self) -> str:
        return (
            f"FullTokenizer(vocab_file={str(self.vocab_file)!r}, vocab_size={len(self.vocab)}, "
            f"do_lower_case={self.basic_tokenizer.do_lower_case}, use_fast={self.use_fast})"
        )

    # -- reference API ---------------------------------------------------------------------------------------------

    def tokenize(self, text: str | bytes) -> list[str]:
        """Word pieces of ``text`` (no special tokens)."""
        pieces: list[str] = []
        for word in self.basic_tokenizer.tokenize(text):
            pieces.extend(self.wordpiece_tokenizer.tokenize_word(word))
        return pieces

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens``; an unknown token raises ``KeyError`` (as the reference)."""
        return [self.vocab[token] for token in tokens]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids``; an unknown id raises ``KeyError`` (as the reference)."""
        return [self.inv_vocab[int(index)] for index in ids]

    @staticmethod
    def convert_tokens_to_string(tokens: Sequence[str], clean_up_tokenization_spaces: bool = True) -> str:
        """Join word pieces back into text (``##`` pieces glued), optionally tidying English spacing."""
        text = " ".join(tokens).replace(" ##", "").strip()
        if not clean_up_tokenization_spaces:
            return text
        for spaced, tidy in _CLEANUP_REPLACEMENTS:
            text = text.replace(spaced, tidy)
        return text

    def vocab_size(self) -> int:
        """Number of vocabulary entries (21128 for the shipped vocabulary)."""
        return len(self.vocab)

    def __call__(
        self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, warn_truncation: bool = False
    ) -> torch.LongTensor:
        """:func:`tokenize` with this tokenizer's vocabulary (the interface every tokenizer of an arch shares)."""
        return _tokenize_with(self, texts, context_length, warn_truncation)

    @staticmethod
    def normalize(text: str) -> str:
        """:func:`normalize_text`: the reference's training/evaluation text preparation."""
        return normalize_text(text)

    # -- ids -------------------------------------------------------------------------------------------------------

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of ``text`` without [CLS]/[SEP]."""
        return [self.vocab[piece] for piece in self.tokenize(text)]

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        """Token ids of every text without [CLS]/[SEP]; same result as :meth:`encode`, much faster.

        1. A text made only of "solo" characters (CJK, punctuation, whitespace, dropped characters) is looked up per
           character (:meth:`_solo_ids`).
        2. Any other text without ``Σ`` is cut at characters that always end a word (ASCII whitespace and
           punctuation, CJK; :data:`_SEGMENT_RE`); the runs between them are tokenised independently and memoised
           (:meth:`_encode_runs`). ``Σ`` is excluded because Python lower-cases it by context (final ``ς``), and
           that context can reach across punctuation.
        3. Texts with ``Σ`` go through the Python back end.
        """
        decoded = [to_unicode(text) for text in texts]
        result: list[list[int] | None] = [self._solo_ids(text) for text in decoded]
        pending = [i for i, ids in enumerate(result) if ids is None]
        segmented = {i: _SEGMENT_RE.split(decoded[i]) for i in pending if _GREEK_CAPITAL_SIGMA not in decoded[i]}
        self._encode_runs({run for parts in segmented.values() for run in parts[::2] if run})
        for i in pending:
            parts = segmented.get(i)
            result[i] = self.encode(decoded[i]) if parts is None else self._join_segments(parts)
        return result  # type: ignore[return-value]

    def _join_segments(self, parts: list[str]) -> list[int]:
        """Ids of a text split by :data:`_SEGMENT_RE`: runs at even positions, boundary characters at odd ones."""
        ids: list[int] = []
        runs, solo = self._runs, self._solo
        for index, part in enumerate(parts):
            if index % 2:
                if part not in solo:
                    self._learn_solo(part)
                ids.extend(solo[part])  # type: ignore[arg-type]  # every boundary character is solo
            elif part:
                ids.extend(runs[part])
        return ids

    def _encode_runs(self, runs: set[str]) -> None:
        """Make sure every run is in the memo: Rust for runs whose characters are proven safe, Python otherwise."""
        missing = [run for run in runs if run not in self._runs]
        if not missing:
            return
        if len(self._runs) + len(missing) > _RUN_MEMO_SIZE:
            self._runs.clear()
        fast = self._fast_path()
        accepted = [run for run in missing if fast.accepts(run)] if fast is not None else []
        if accepted:
            self._runs.update(zip(accepted, fast.encode_batch(accepted), strict=True))  # type: ignore[union-attr]
        for run in missing:
            if run not in self._runs:
                self._runs[run] = self.encode(run)

    def _solo_ids(self, text: str) -> list[int] | None:
        """Ids of ``text`` by per-character lookup, or ``None`` when some character needs its neighbours.

        A "solo" character tokenises the same wherever it stands: a CJK character (always a word of its own), a
        character that normalises to punctuation only (always split off), whitespace, or a character the
        reference drops. For a text made only of those, the ids are the concatenation of each character's ids.
        """
        if not self._solo_chars.issuperset(text):
            for char in set(text).difference(self._solo, self._solo_chars):
                self._learn_solo(char)
            if not self._solo_chars.issuperset(text):
                return None
        return list(itertools.chain.from_iterable(map(self._solo.__getitem__, text)))  # type: ignore[arg-type]

    def _learn_solo(self, char: str) -> None:
        ids = self._solo[char] = self._classify_solo(char)
        if ids is not None:
            self._solo_chars.add(char)

    def _classify_solo(self, char: str) -> tuple[int, ...] | None:
        if char in ("\x00", "\ufffd") or is_control_char(char) or is_whitespace_char(char):
            return ()
        normalized = strip_accents(char.lower()) if self.basic_tokenizer.do_lower_case else char
        if is_cjk_char(char) or (normalized and all(is_punctuation_char(c) for c in normalized)):
            return tuple(self.encode(char))
        return None

    def _fast_path(self) -> _FastPath | None:
        if not self.use_fast:
            return None
        if self._fast is None:
            try:
                self._fast = _FastPath(self.vocab, self.basic_tokenizer)
            except ImportError:
                _logger.warning("the 'tokenizers' package is not installed; tokenising in pure Python")
                self.use_fast = False
                return None
        return self._fast


_CLEANUP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


@functools.lru_cache(maxsize=1)
def _wordpiece() -> FullTokenizer:
    return FullTokenizer()


def get_tokenizer(arch: Any = None) -> FullTokenizer | HFTokenizer:
    """The tokenizer of an architecture, built on first call and cached.

    ``arch``: None, a ``"vision@text"`` name, a released name, a ``CLIPCfg`` or a text tower config. The BERT
    towers (every released Chinese tower) get the shared WordPiece over the shipped ``vocab.txt``, id-identical to
    the reference; a Hugging Face tower gets its folder's ``AutoTokenizer`` (:class:`HFTokenizer`). Both are called
    the same way: ``tokenizer(texts, context_length) -> LongTensor[N, context_length]``, and
    ``tokenizer.normalize(text)`` is the training/evaluation text preparation.
    """
    text_cfg = _text_cfg_of(arch)
    if text_cfg is None or text_cfg.kind == "bert":
        return _wordpiece()
    return _hf_tokenizer(text_cfg.hf_model, text_cfg.context_length)


def _text_cfg_of(arch: Any) -> Any:
    if arch is None:
        return None
    if isinstance(arch, str):
        from cn_clip.models.factory import resolve_config

        return resolve_config(arch).text
    return getattr(arch, "text", arch)


@functools.lru_cache(maxsize=8)
def _hf_tokenizer(hf_model: str, context_length: int) -> HFTokenizer:
    return HFTokenizer(hf_model, context_length)


class HFTokenizer:
    """A Hugging Face tower's ``AutoTokenizer`` with :func:`tokenize`'s interface.

    Rows are the tokenizer's own special tokens around the text, cut to ``context_length`` (special tokens kept)
    and right-padded with the model config's ``pad_token_id``, which is what the tower masks. Text is
    whitespace-collapsed first, as open_clip's ``HFTokenizer`` does; case is kept (these vocabularies are cased).
    """

    def __init__(self, hf_model: str, context_length: int = 77) -> None:
        from transformers import AutoTokenizer

        from cn_clip.models.text import load_hf_text_config, resolve_hf_folder

        folder = resolve_hf_folder(hf_model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: no tokenizer files AutoTokenizer can read ({exc})") from exc
        self.hf_model = hf_model
        self.pad_id = int(load_hf_text_config(hf_model).pad_token_id)
        self.context_length = context_length

    def __repr__(self) -> str:
        return f"HFTokenizer({self.hf_model!r}, context_length={self.context_length})"

    @staticmethod
    def normalize(text: str) -> str:
        return text

    @staticmethod
    def clean(text: str | bytes) -> str:
        """HTML entities decoded (twice, as open_clip) and whitespace runs collapsed to one space."""
        return " ".join(html.unescape(html.unescape(to_unicode(text))).split())

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        import torch

        length = context_length or self.context_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise ValueError(f"context_length must be an integer >= 2, got {length!r}")
        items = _as_text_list(texts)
        encoded = self.tokenizer([self.clean(text) for text in items], max_length=length, truncation=True)["input_ids"]
        rows = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        for row, ids in zip(rows, encoded, strict=True):
            row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return rows


def normalize_text(text: str) -> str:
    """Lower-case and turn curly double quotes into ``"``: the reference's training/evaluation text preparation.

    ``tokenize()`` does not apply it (ids stay identical to the reference API, where ``“`` becomes ``[UNK]``);
    training, evaluation and zero-shot prompts do.
    """
    return text.lower().translate(_CURLY_QUOTE_TABLE)


def _check_context_length(context_length: Any) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise ValueError(f"context_length must be an integer, got {context_length!r}")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 ([CLS] + [SEP]), got {context_length}")
    # No upper bound here, as in the reference: the text tower's position limit (512 for the released towers) is
    # checked against the model (models/positions.py), which may have interpolated positions beyond it.
    return context_length


def _as_text_list(texts: Any) -> list[str | bytes]:
    if isinstance(texts, str | bytes | bytearray):
        return [texts]
    try:
        items = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}") from None
    for index, item in enumerate(items):
        if not isinstance(item, str | bytes | bytearray):
            raise TypeError(f"texts[{index}] must be a str, got {type(item).__name__}: {item!r:.80}")
    return items


def tokenize(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, warn_truncation: bool | None = None
) -> torch.LongTensor:
    """Token ids as a ``LongTensor[N, context_length]``, identical to the reference ``cn_clip.clip.tokenize``.

    Each row is ``[CLS]`` + the first ``context_length - 2`` word-piece ids + ``[SEP]``, right-padded with 0.
    Longer texts are cut, as in the reference (same ids); the first call that cuts logs a warning naming them
    (``warn_truncation=None``, once per process), ``True`` warns on every such call, ``False`` never
    (compatibility.md#fix-truncation-warning).
    Text is not normalised (see :func:`normalize_text`).
    """
    return _tokenize_with(_wordpiece(), texts, context_length, warn_truncation)


def _tokenize_with(
    tokenizer: FullTokenizer, texts: str | Sequence[str], context_length: int, warn_truncation: bool
) -> torch.LongTensor:
    import numpy as np
    import torch

    context_length = _check_context_length(context_length)
    items = _as_text_list(texts)
    all_ids = tokenizer.encode_batch(items)
    keep = context_length - 2
    rows = np.zeros((len(all_ids), context_length), dtype=np.int64)
    rows[:, 0] = tokenizer.vocab[CLS_TOKEN]
    sep = tokenizer.vocab[SEP_TOKEN]
    for row, ids in zip(rows, all_ids, strict=True):
        ids = ids[:keep]
        row[1 : len(ids) + 1] = ids
        row[len(ids) + 1] = sep
    if warn_truncation is not False:
        _log_truncation(all_ids, keep, context_length, once=warn_truncation is None)
    return torch.from_numpy(rows)


_truncation_warned = False  # the once-per-process default of tokenize(warn_truncation=None)


def _log_truncation(all_ids: list[list[int]], keep: int, context_length: int, once: bool) -> None:
    global _truncation_warned
    indices = [i for i, ids in enumerate(all_ids) if len(ids) > keep]
    if not indices or (once and _truncation_warned):
        return
    if once:
        _truncation_warned = True
    shown = ", ".join(f"#{i} ({len(all_ids[i]) + 2} tokens)" for i in indices[:5])
    more = f" and {len(indices) - 5} more" if len(indices) > 5 else ""
    _logger.warning(
        "%d of %d texts are longer than context_length=%d and were truncated: %s%s%s",
        len(indices),
        len(all_ids),
        context_length,
        shown,
        more,
        " (warned once; later truncations are silent, pass warn_truncation=True to see each)" if once else "",
    )
