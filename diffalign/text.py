"""Reading text that users hand us: line by line, strictly as UTF-8, with every problem named by file and line.

    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "prompts.txt"
    >>> _ = path.write_bytes(b"a fox\\n\\xff bad\\n")
    >>> for line in text_lines(path):          # TextLine(number, text, problem); number is 1-based
    ...     print(line.number, line.text, line.problem)
    1 a fox None
    2 None line 2 of .../prompts.txt is not UTF-8 (byte 0xff at column 1)
    >>> text_problem(3)                       # why a value (a prompt) is not usable text, or None
    'prompt is a number (3), not text'

``read_text(path)`` reads a small whole file (a JSON document), with a ``TextError`` on the first problem;
``json_array_items(path)`` yields the items of a large top-level JSON array one at a time.

Every reader of prompts, captions and metadata goes through these (``diffalign.data.jsonl``, ``hpdv2``,
``validation.make_record``, ``evaluation.prompts``, ``rewards.scoring``,
``evaluation.pairs``), so bad text is reported the same way everywhere: a counted skip naming the file and line
where skipping one line makes sense, a one-line ``TextError`` where it does not.

What counts as bad text: bytes that are not UTF-8, a NUL character (a binary or zero-filled, damaged file), and
lone surrogates (from a ``\\udXXX`` JSON escape, or from an undecodable byte in ``json_array_items``). A UTF-8
byte-order mark at the start of a file is dropped, as Windows editors write one. Lines end at ``\\n``; a ``\\r``
before it is dropped too.

Writing: ``write_jsonl(path, entries)`` writes the JSON-lines files diffalign hands back (views of ``diffalign
pairs``, scores of ``diffalign eval``, the tiny data), one object per line.

This module imports only ``diffalign.errors``, so every part of the package can use it.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from diffalign.errors import DataError

MAX_JSON_ITEM_CHARS = 64 * 2**20  # json_array_items: one item larger than this is an error, not a memory blow-up


class TextError(DataError):
    """Text that cannot be read at all (one line, naming the file and where in it)."""


class TextLine(NamedTuple):
    number: int  # 1-based line number
    text: str | None  # the decoded line without its line ending; None when there is a problem
    problem: str | None  # a sentence naming the file, the line and what is wrong; None when the line is fine


def decode_utf8(raw: bytes) -> tuple[str | None, str | None]:
    """Bytes -> (text, None), or (None, "is not UTF-8 (byte 0xff at column 12)") with a 1-based byte column."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as error:
        return None, f"is not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"


def text_lines(path: str | Path) -> Iterator[TextLine]:
    """The lines of a file, read one at a time (memory does not grow with the file), each decoded strictly."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            text, problem = decode_utf8(raw)
            if problem is None:
                problem = text_problem(text, "line")
            if problem is not None:
                yield TextLine(number, None, f"line {number} of {path} {problem.removeprefix('line ')}")
            else:
                yield TextLine(number, text, None)


def text_problem(value: Any, what: str = "prompt") -> str | None:
    """Why ``value`` is not usable text, as "<what> is ..." (None when it is a clean string; empty is allowed)."""
    if not isinstance(value, str):
        return f"{what} is {describe_value(value)}, not text"
    if "\x00" in value:
        return f"{what} has a NUL character at column {value.index(chr(0)) + 1} (a binary or damaged file?)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates: only these fail to encode
        code = ord(value[error.start])
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte kept by the surrogateescape error handler
            return f"{what} is not UTF-8 (byte 0x{code - 0xDC00:02x} at column {error.start + 1})"
        return f"{what} has a lone surrogate \\u{code:04x} at column {error.start + 1} (a broken \\u escape)"
    return None


def describe_value(value: Any) -> str:
    """A short description of a non-text value, in JSON's words (null, a number, a list, an object)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def read_text(path: str | Path) -> str:
    """A whole (small) file as text, lines joined by ``\\n``; ``TextError`` naming the first bad line."""
    lines = []
    for line in text_lines(path):
        if line.problem is not None:
            raise TextError(f"{line.problem}; save the file as UTF-8 text")
        lines.append(line.text)
    return "\n".join(lines)


def json_problem(error: json.JSONDecodeError) -> str:
    return f"{error.msg} at line {error.lineno}, column {error.colno}"


class LineSkips:
    """Lines a prompt reader skipped, counted per reason with the first example, for one logged line."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.first: str | None = None

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        self.first = self.first or detail

    def summary(self, what: str, kept: int) -> str | None:
        """'<what>: kept 10, skipped 2 (bad_json: 1, bad_text: 1); first: line 3 of ...' or None if none."""
        if not self.counts:
            return None
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.counts.items()))
        return f"{what}: kept {kept}, skipped {sum(self.counts.values())} ({reasons}); first: {self.first}"


def write_jsonl(path: str | Path, entries: list[dict]) -> Path:
    """Write ``entries`` as JSON lines (one object per line, ``\\n`` after each), creating the parent folder.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


# ---------------------------------------------------------------------------------------------- large JSON arrays
def json_array_items(path: str | Path, chunk_chars: int = 2**20) -> Iterator[tuple[int, str, Any]]:
    """Stream the items of a file holding one JSON array: yields ``(index, where, item)``, ``where`` being
    "item 12 (line 1) of /x/train.json". Memory holds one chunk and one item, never the whole file.

    Undecodable bytes are kept as lone surrogates (Python's ``surrogateescape``), so a bad byte inside a string
    spoils only that item: check its strings with ``text_problem``, which names the byte. Anything that stops
    the parse (not an array, malformed JSON, a bad byte outside a string, an item over 64 MB) is a one-line
    ``TextError`` naming the item and line. Standard library only (no streaming-JSON dependency): the array is
    cut into items with ``json.JSONDecoder.raw_decode``.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    with open(path, "rb") as handle:
        buffer, pos, line, eof = "", 0, 1, False

        def more() -> bool:  # drop what was parsed, append the next chunk; False once nothing more comes
            nonlocal buffer, pos, line, eof
            if eof:
                return False
            raw = handle.read(chunk_chars)
            eof = not raw
            added = utf8.decode(raw, final=eof)
            line += buffer.count("\n", 0, pos)
            buffer, pos = buffer[pos:] + added, 0
            return not eof or bool(added)

        def skip_space() -> str:  # the next non-space character, not consumed ("" at the end of the file)
            nonlocal pos
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buffer):
                    return buffer[pos]
                if not more():
                    return ""

        def here() -> str:
            return f"(line {line + buffer.count(chr(10), 0, pos)}) of {path}"

        if skip_space() == "\ufeff":  # a UTF-8 byte-order mark
            pos += 1
        if skip_space() != "[":
            found = buffer[pos:pos + 20] or "nothing"
            raise TextError(f"{path} is not a JSON array: it starts with {found!r}, expected '['")
        pos += 1
        index = 0
        while True:
            char = skip_space()
            if char == "]":
                pos += 1
                break
            if index > 0:
                if char != ",":
                    found = repr(char) if char else "the end of the file"
                    raise TextError(f"{path}: expected ',' or ']' after item {index - 1}, found {found} {here()}; "
                                    "the file is damaged or cut short")
                pos += 1
                skip_space()
            while True:
                try:
                    item, end = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError as error:
                    bad = buffer[error.pos] if error.pos < len(buffer) else ""
                    if bad and 0xDC80 <= ord(bad) <= 0xDCFF:  # an undecodable byte outside any string
                        raise TextError(f"item {index} {here()} is not UTF-8 (byte 0x{ord(bad) - 0xDC00:02x} outside "
                                        "a string); save the file as UTF-8") from None
                    if len(buffer) - pos > MAX_JSON_ITEM_CHARS or not more():
                        raise TextError(f"item {index} {here()} is not valid JSON: {error.msg}; the file is "
                                        "damaged or cut short") from None
                    continue
                length = end - pos
                if end < len(buffer) or not more():  # a value ending where the chunk ends may go on: read on
                    break
            where = f"item {index} {here()}"
            pos += length
            yield index, where, item
            index += 1
        if skip_space() != "":
            raise TextError(f"{path}: more text after the closing ']' {here()}; expected one JSON array")
