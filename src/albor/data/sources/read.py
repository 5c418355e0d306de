"""One file or row seen: its decoded text (PEP 263 coding cookies honoured) or the reason it was
rejected, from `stat` before any open.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tokenize
from dataclasses import dataclass

# Why a file or row was not kept. Files: the first eight; rows of Parquet / JSONL / hf: the rest,
# plus binary / invalid_utf8 / bad_encoding / empty / too_large, which apply to a row's text as they
# do to a file's.
BINARY = "binary"
INVALID_UTF8 = "invalid_utf8"
BAD_ENCODING = "bad_encoding"
EMPTY = "empty"
TOO_LARGE = "too_large"
UNREADABLE = "unreadable"
BROKEN_LINK = "broken_link"
NOT_A_FILE = "not_a_file"
NOT_JSON = "not_json"
MISSING_COLUMN = "missing_column"
NULL_TEXT = "null_text"
NOT_TEXT = "not_text"
REASONS = (
    BINARY,
    INVALID_UTF8,
    BAD_ENCODING,
    EMPTY,
    TOO_LARGE,
    UNREADABLE,
    BROKEN_LINK,
    NOT_A_FILE,
    NOT_JSON,
    MISSING_COLUMN,
    NULL_TEXT,
    NOT_TEXT,
)


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Read:
    """One file or row seen: its text when kept, else the reason it was rejected."""

    path: str
    text: str | None
    reason: str | None = None


def stat_reason(st: os.stat_result, max_bytes: int) -> str | None:
    """The rejection that `stat` alone can tell, before any byte is read."""
    if not stat.S_ISREG(st.st_mode):
        return NOT_A_FILE
    if st.st_size > max_bytes:
        return TOO_LARGE
    if st.st_size == 0:
        return EMPTY
    return None


def decode(data: bytes) -> tuple[str | None, str | None]:
    """(text, None) for usable source bytes, (None, reason) otherwise.

    Decoded as Python decodes a source file (`tokenize.detect_encoding`, PEP 263): UTF-8, without
    its BOM, unless a coding cookie in the first two lines names another codec. A cookie naming a
    codec Python does not know, or a BOM contradicting the cookie, is `bad_encoding`; bytes that
    are not UTF-8 where no cookie says otherwise are `invalid_utf8`."""
    if b"\0" in data:
        return None, BINARY
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as e:
        # "invalid or missing encoding declaration": a first line that is not UTF-8 and holds no
        # cookie. Anything else ("unknown encoding: x", "encoding problem: utf-8") is the cookie.
        return None, INVALID_UTF8 if "invalid or missing" in str(e) else BAD_ENCODING
    try:
        text = data.decode(encoding)
    except LookupError:  # a codec that is not a text encoding, such as rot13 or hex
        return None, BAD_ENCODING
    except UnicodeDecodeError:
        return None, INVALID_UTF8 if encoding in ("utf-8", "utf-8-sig") else BAD_ENCODING
    # utf-8-sig drops a BOM; another codec may decode one, and the model should not learn it.
    text = text.removeprefix("\ufeff")
    if not text.strip():
        return None, EMPTY
    return text, None


def read_file(path: str, max_bytes: int) -> tuple[str | None, str | None]:
    """Read one source file: (text, None) or (None, reason). Never blocks on a FIFO."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, BROKEN_LINK if os.path.islink(path) else UNREADABLE
    except OSError as e:
        return None, BROKEN_LINK if e.errno == errno.ELOOP else UNREADABLE
    reason = stat_reason(st, max_bytes)
    if reason is not None:
        return None, reason
    try:
        # O_NONBLOCK: if the file was swapped for a FIFO after the stat, opening it must not block.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None, UNREADABLE
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None, NOT_A_FILE
            data = f.read(max_bytes + 1)
    except OSError:
        return None, UNREADABLE
    if len(data) > max_bytes:  # it grew since the stat
        return None, TOO_LARGE
    return decode(data)


def check_text(path: str, text: str, max_bytes: int) -> Read:
    """The checks a file's bytes get, applied to a row's text."""
    if "\0" in text:
        return Read(path, None, BINARY)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from a JSON `\ud800` escape
        return Read(path, None, INVALID_UTF8)
    if size > max_bytes:
        return Read(path, None, TOO_LARGE)
    if not text.strip():
        return Read(path, None, EMPTY)
    return Read(path, text.removeprefix("\ufeff"))
