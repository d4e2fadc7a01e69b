"""Entry-point plumbing: logging is configured once here, and user errors become one line plus exit code 2."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cn_clip.errors import CnClipError

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(message)s"
LOG_DATEFMT = "%Y-%m-%d,%H:%M:%S"


def setup_logging(level: int = logging.INFO, log_file: str | None = None, prefix: str = "") -> None:
    """Configure the root logger in the reference's format (``--debug`` → DEBUG)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    fmt = logging.Formatter(LOG_FORMAT.replace("%(message)s", f"{prefix}%(message)s"), datefmt=LOG_DATEFMT)
    for handler in handlers:
        handler.setFormatter(fmt)
    logging.basicConfig(level=level, handlers=handlers, force=True)
    # faiss logs each CPU-specific library it fails to find at INFO ("Could not load ... AVX512"): noise, not news.
    logging.getLogger("faiss.loader").setLevel(max(level, logging.WARNING))


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a :class:`CnClipError` (or a missing file) prints one line and returns 2."""
    try:
        code = main(argv)
    except CnClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc.strerror or 'file not found'}: {exc.filename}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on device while writing {exc.filename or 'output'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def print_params(args: Any) -> None:
    """The reference's ``Params:`` block (sorted ``name: value`` lines)."""
    print("Params:")
    for name in sorted(vars(args)):
        print(f"  {name}: {getattr(args, name)}")
    sys.stdout.flush()
