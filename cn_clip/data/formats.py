"""Raw dataset and LMDB record formats (compatibility.md#data-formats): TSV image lines, JSONL text lines, base64, pair
pickles.

Everything here is pure parsing with messages that name the file, line and id, so the builder, the readers and the
importers agree on one definition of "valid".
"""

from __future__ import annotations

import binascii
import io
import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cn_clip.errors import DataError

NUM_SAMPLES_KEY = b"num_samples"
NUM_IMAGES_KEY = b"num_images"
# The reference pickles with the interpreter default, which is protocol 4 on CPython 3.8-3.13. Pinning it keeps the
# bytes identical on interpreters whose default moved on (3.14 defaults to 5).
PAIR_PICKLE_PROTOCOL = 4
TEXT_FIELDS = ("text_id", "text", "image_ids")

B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_"
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")
# Enough base64 for Pillow to read the header of almost every file; the rest is only checked for its alphabet.
_HEADER_B64_CHARS = 2048

Id = int | str


# --------------------------------------------------------------------------------------------------- base64 / images


def b64encode_image(raw: bytes) -> str:
    """Standard base64 text of the image file bytes (what the reference's raw TSV holds)."""
    return binascii.b2a_base64(raw, newline=False).decode("ascii")


def b64decode_image(data: bytes | str | memoryview) -> bytes:
    """Decode standard or URL-safe base64 (the reference's readers accept both)."""
    if isinstance(data, str):
        data = data.encode("ascii")
    if isinstance(data, memoryview | bytearray):
        data = bytes(data)
    if b"-" in data or b"_" in data:
        data = data.translate(_URLSAFE_TO_STD)
    return binascii.a2b_base64(data)


def base64_problem(
    data: bytes | bytearray, start: int = 0, end: int | None = None, alphabet_ok: bool = False
) -> str | None:
    """Why ``data[start:end]`` is not decodable base64 text, or None. Cheap: no decode.

    ``alphabet_ok`` skips the per-character check when the caller already checked a whole chunk at once.
    """
    end = len(data) if end is None else end
    length = end - start
    if length <= 0:
        return "empty base64 field"
    if not alphabet_ok:
        stray = bytes(data[start:end]).translate(None, B64_ALPHABET)
        if stray:
            return f"invalid base64: character {stray[:1].decode('latin-1')!r} is not in the base64 alphabet"
    pad = data.find(b"=", start, end)
    if pad != -1 and bytes(data[pad:end]) not in (b"=", b"=="):
        return "invalid base64: '=' padding inside the data"
    if length % 4:
        return f"invalid base64: length {length} is not a multiple of 4 (truncated line?)"
    return None


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(raw: bytes) -> str | None:
    """Pillow format name from the file signature (a hint only: Pillow still parses the header)."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if raw.startswith(magic):
            return name
    return None


def _open_problem(raw: bytes, full: bool, formats: list[str] | None) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw), formats=formats) as img:
            if full:
                img.load()
    except Exception as exc:  # Pillow raises many unrelated types (OSError, SyntaxError, struct.error, ...)
        return f"not an image Pillow can open ({type(exc).__name__}: {exc})"
    return None


def image_problem(raw: bytes, full: bool = False) -> str | None:
    """Why Pillow cannot open ``raw``, or None. ``full`` also decodes the pixels (slow)."""
    hint = sniff_format(raw)
    # Naming the format skips Pillow's probing of every plugin: 3x faster for the common formats.
    if hint is not None and _open_problem(raw, full, [hint]) is None:
        return None
    return _open_problem(raw, full, None)


def check_b64_image(
    data: bytes | bytearray, start: int = 0, end: int | None = None, full: bool = False, alphabet_ok: bool = False
) -> str | None:
    """Validate one TSV base64 field ``data[start:end]``: alphabet, padding, and an image Pillow can open."""
    end = len(data) if end is None else end
    problem = base64_problem(data, start, end, alphabet_ok)
    if problem:
        return problem
    view = memoryview(data)
    # Decoding only the head and the tail is ~10x cheaper; a header that needs more bytes, or a file that does not
    # end the way its format ends (truncated?), falls through to a full decode.
    head_only = not full and end - start > _HEADER_B64_CHARS
    if head_only:
        head = b64decode_image(view[start : start + _HEADER_B64_CHARS])
        if image_problem(head) is None:
            tail = b64decode_image(view[end - _TAIL_B64_CHARS : end])
            padding = 2 - len(bytes(view[end - 2 : end]).rstrip(b"="))
            if ends_complete(head, tail, (end - start) // 4 * 3 - padding):
                return None
            full = True
    try:
        raw = b64decode_image(view[start:end])
    except binascii.Error as exc:
        return f"invalid base64 ({exc})"
    if not full and not ends_complete(raw, raw, len(raw)):
        full = True
    return image_problem(raw, full=full)


_TAIL_B64_CHARS = 64  # 48 bytes: enough for the end markers below (and trailing padding bytes)
_PNG_END = b"IEND\xaeB`\x82"


def ends_complete(head: bytes, tail: bytes, size: int) -> bool:
    """Whether a file that starts with ``head`` and ends with ``tail`` (``size`` bytes in all) ends the way its
    format ends: JPEG's EOI marker, PNG's IEND chunk, GIF's trailer, WebP's RIFF length. Cheap; a file that fails
    it may still be whole (bytes after the end marker), so callers decode it fully to be sure."""
    fmt = sniff_format(head)
    body = tail.rstrip(b"\x00\r\n ")
    if fmt == "JPEG":
        return body.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return body.endswith(_PNG_END)
    if fmt == "GIF":
        return body.endswith(b"\x3b")
    if fmt == "WEBP":
        return int.from_bytes(head[4:8], "little") + 8 <= size
    return True


# ------------------------------------------------------------------------------------------------------- TSV lines


def split_tsv_line(line: bytes) -> tuple[bytes, bytes]:
    """``b"<id>\\t<base64>"`` → (id, base64), stripped like the reference (``line.strip().split("\\t")``).

    Raises ValueError with a user-facing message.
    """
    # The reference strips str, which also removes Unicode spaces; ASCII lines take the cheap bytes path.
    line = line.strip() if line.isascii() else line.decode("utf-8", "strict").strip().encode("utf-8")
    fields = line.split(b"\t")
    if len(fields) != 2:
        raise ValueError(f"expected 2 tab-separated fields (image_id, base64), found {len(fields)}")
    image_id, value = fields
    if not image_id:
        raise ValueError("empty image id")
    if b"\r" in line:
        raise ValueError("stray carriage return inside the line")
    return image_id, value


def decode_id(raw_id: bytes) -> str:
    try:
        return raw_id.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"image id is not valid UTF-8 ({exc.reason})") from None


# ------------------------------------------------------------------------------------------------------ JSONL texts


@dataclass(frozen=True)
class TextRecord:
    text_id: Id
    text: str
    image_ids: tuple[Id, ...]


def _is_id(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


def json_object(line: str) -> dict:
    """One JSONL line that must hold an object. Raises ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    return obj


def parse_text_line(line: str) -> TextRecord:
    """One JSONL line → TextRecord. Raises ValueError naming the offending field."""
    obj = json_object(line)
    missing = [field for field in TEXT_FIELDS if field not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    text_id, text, image_ids = obj["text_id"], obj["text"], obj["image_ids"]
    if not _is_id(text_id):
        raise ValueError(f"text_id {text_id!r} must be an integer or a string")
    if not isinstance(text, str):
        raise ValueError(f"text_id {text_id}: text must be a string, found {type(text).__name__}")
    if not isinstance(image_ids, list):
        raise ValueError(f"text_id {text_id}: image_ids must be a list, found {type(image_ids).__name__}")
    bad = [image_id for image_id in image_ids if not _is_id(image_id)]
    if bad:
        raise ValueError(f"text_id {text_id}: image id {bad[0]!r} must be an integer or a string")
    return TextRecord(text_id, text, tuple(image_ids))


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line) for each non-blank line of a UTF-8 JSONL file."""
    with open(path, encoding="utf-8", newline=None) as handle:
        for line_no, line in enumerate(handle, 1):
            stripped = line.strip()
            if stripped:
                yield line_no, stripped


def read_text_records(path: str | Path) -> Iterator[tuple[int, TextRecord]]:
    """Parse a texts JSONL strictly: the first bad line raises DataError with ``file:line``."""
    name = Path(path).name
    try:
        for line_no, line in iter_text_lines(path):
            try:
                yield line_no, parse_text_line(line)
            except ValueError as exc:
                raise DataError(f"{name}:{line_no}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


# ------------------------------------------------------------------------------------------------------- LMDB pairs


def dumps_pair(image_id: Id, text_id: Id, text: str) -> bytes:
    """The ``pairs`` value: pickle of ``(image_id, text_id, text)`` exactly as the reference writes it."""
    return pickle.dumps((image_id, text_id, text), protocol=PAIR_PICKLE_PROTOCOL)


class _PairUnpickler(pickle.Unpickler):
    """Builds only tuples, ints and strings: any global lookup (the way pickles run code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def loads_pair(data: bytes | memoryview, key: str = "?") -> tuple[Id, Id, str]:
    """Safely unpickle one ``pairs`` value; anything but ``(int|str, int|str, str)`` raises DataError."""
    try:
        value = _PairUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"pairs key {key}: not a (image_id, text_id, text) pickle: {exc}") from None
    if (
        type(value) is not tuple
        or len(value) != 3
        or not _is_id(value[0])
        or not _is_id(value[1])
        or not isinstance(value[2], str)
    ):
        shown = repr(value)[:80]
        raise DataError(f"pairs key {key}: expected (image_id, text_id, text) of int|str, int|str, str; got {shown}")
    return value


# ---------------------------------------------------------------------------------------------------------- ids


def image_id_from_key(key: bytes | str, rule: str = "auto") -> Id:
    """The image id an ``imgs`` key stands for.

    ``auto`` (default): a canonical decimal integer (``"7"``, ``"-3"``, no leading zeros, no sign ``+``) becomes an
    int, everything else stays a string, so ``"007"`` and ``"abc"`` round-trip unchanged. ``int`` is the reference's
    rule (``int(key)``, ``"007"`` → 7, error on non-numeric keys); ``str`` keeps every key a string.
    """
    if isinstance(key, memoryview | bytearray):
        key = bytes(key)
    text = key.decode("utf-8") if isinstance(key, bytes) else key
    if rule == "str":
        return text
    if rule == "int":
        try:
            return int(text)
        except ValueError:
            raise DataError(f"image key {text!r} is not an integer (use --image-id-type auto or str)") from None
    if rule != "auto":
        raise ValueError(f"unknown image id rule {rule!r}")
    digits = text[1:] if text.startswith("-") else text
    if digits.isascii() and digits.isdigit() and str(int(text)) == text:
        return int(text)
    return text
