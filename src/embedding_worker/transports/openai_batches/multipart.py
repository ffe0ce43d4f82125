"""A streaming reader of `multipart/form-data` bodies (RFC 7578), as the openai SDK, curl and
browsers send a file upload: the file part's bytes go to a sink as they arrive, never held whole;
the other fields are kept, each bounded.

Each chunk costs work in proportion to its size (a `bytes.find` for the boundary), so the body is
read at the pace it arrives with nothing buffered beyond one chunk and a boundary's length.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ... import errors

MAX_HEADER_BYTES = 8 * 1024  # one part's headers
MAX_FIELD_BYTES = 4 * 1024  # a field other than the file (purpose, expires_after[...])
MAX_PARTS = 16

_BOUNDARY = re.compile(r"""boundary=(?:"([^"]{1,200})"|([^\s;,"]{1,200}))""", re.I)
_PARAM = re.compile(r"""(\w+)\*?=(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))""")


def boundary_of(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type; 400 for any other type."""
    kind = content_type.partition(";")[0].strip().lower()
    found = _BOUNDARY.search(content_type)
    if kind != "multipart/form-data" or found is None:
        raise errors.invalid_input(
            "the upload must be multipart/form-data with a 'file' and a 'purpose' field"
        )
    return (found.group(1) or found.group(2)).encode("latin-1")


def _disposition(headers: bytes) -> dict[str, str]:
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            text = value.decode("utf-8", "replace")
            return {k.lower(): (q if q else p) for k, q, p in _PARAM.findall(text)}
    return {}


class FormReader:
    """Feed it the body's chunks; `file_part` (the field name) goes to `sink`, the rest to
    `fields`. `finish` checks the body ended with the closing boundary."""

    def __init__(self, boundary: bytes, file_part: str, sink: Callable[[bytes], None]) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._file_part = file_part
        self._sink = sink
        self._buffer = b"\r\n"  # so that the first boundary matches the delimiter too
        self._state = "preamble"  # preamble, headers, data, done
        self._name: str | None = None
        self._parts = 0
        self._field = bytearray()
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.has_file = False

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        while self._step():
            pass

    def finish(self) -> None:
        if self._state != "done":
            raise errors.invalid_input("the multipart body ends before its closing boundary")

    def _step(self) -> bool:
        """Make what progress the buffer allows; whether more may be made."""
        buffer = self._buffer
        if self._state in ("preamble", "data"):
            at = buffer.find(self._delimiter)
            if at < 0:
                keep = len(self._delimiter) + 1
                if len(buffer) > keep:
                    self._data(buffer[: len(buffer) - keep])
                    self._buffer = buffer[len(buffer) - keep :]
                return False
            after = at + len(self._delimiter)
            if len(buffer) < after + 2:
                return False
            self._data(buffer[:at])
            self._end_part()
            if buffer[after : after + 2] == b"--":
                self._state, self._buffer = "done", b""
                return False
            line_end = buffer.find(b"\r\n", after)
            if line_end < 0:
                if len(buffer) - after > 256:
                    raise errors.invalid_input("a multipart boundary line is malformed")
                return False
            self._state, self._buffer = "headers", buffer[line_end + 2 :]
            return True
        if self._state == "headers":
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    raise errors.invalid_input("a multipart part's headers are too long")
                return False
            self._start_part(buffer[:end])
            self._state, self._buffer = "data", buffer[end + 4 :]
            return True
        self._buffer = b""  # after the closing boundary: the epilogue is ignored
        return False

    def _start_part(self, headers: bytes) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise errors.invalid_input(f"the upload has more than {MAX_PARTS} parts")
        disposition = _disposition(headers)
        self._name = disposition.get("name")
        if self._name == self._file_part:
            if self.has_file:
                raise errors.invalid_input("the upload has more than one file", param="file")
            self.has_file = True
            self.filename = disposition.get("filename") or "upload.jsonl"
        self._field.clear()

    def _data(self, data: bytes) -> None:
        if self._state != "data" or not data:
            return
        if self._name == self._file_part:
            self._sink(data)
            return
        self._field += data
        if len(self._field) > MAX_FIELD_BYTES:
            raise errors.invalid_input(f"a form field is over {MAX_FIELD_BYTES} bytes")

    def _end_part(self) -> None:
        if self._state == "data" and self._name and self._name != self._file_part:
            self.fields[self._name] = self._field.decode("utf-8", "replace")
        self._name = None
