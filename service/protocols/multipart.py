"""The multipart/form-data body of an upload, split into its parts (RFC 7578).

The body is already in memory, read whole and bounded by MAX_BODY_BYTES, so each delimiter is
found with `bytes.find` on the whole of it (a linear-time search in C): a body costs a small
constant per byte whatever it holds, where a per-byte parser in Python pays for every byte that
looks like the start of a boundary. The work done in Python is bounded by MAX_PARTS and by the
bytes of all the parts' headers together.
"""
import re
from dataclasses import dataclass

from service.errors import InvalidMultipart

MAX_PARTS = 1000  # as Starlette's own form parser allows, for files and for fields
MAX_PART_HEADER_BYTES = 64 * 1024  # all parts' headers together, as MAX_HEADER_BYTES' default
MAX_BOUNDARY_LINE_PADDING = 64  # RFC 2046 lets a delimiter line end in spaces or tabs
# `; name=value` or `; name="quoted \" value"` in Content-Type and Content-Disposition. The
# closing quote is optional so that an unclosed one cannot make the search backtrack.
PARAMETER = re.compile(r';\s*([^\s=;]+)\s*=\s*("[^"\\]*(?:\\.[^"\\]*)*"?|[^;]*)')


@dataclass(frozen=True)
class Part:
    name: str | None
    is_file: bool          # has a filename (filename=, or RFC 5987's filename*=)
    content: memoryview    # a view into the body: copied only if used


def form_parts(body: bytes, content_type: str) -> list[Part]:
    """Every part of a multipart/form-data body, in order; InvalidMultipart if malformed."""
    boundary = parameters(content_type).get("boundary")
    if not boundary:
        raise InvalidMultipart("Missing boundary in multipart.")
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    between = b"\r\n" + delimiter  # every delimiter but a first one at the very start
    view = memoryview(body)
    position = 0 if body.startswith(delimiter) else _after_crlf(body.find(between))
    if position < 0:
        raise InvalidMultipart("invalid multipart body: the boundary of its Content-Type is not in it")
    parts: list[Part] = []
    header_bytes = 0
    while True:
        line_start = position + len(delimiter)
        if body.startswith(b"--", line_start):  # the close delimiter; an epilogue may follow
            return parts
        line_end = body.find(b"\r\n", line_start, line_start + MAX_BOUNDARY_LINE_PADDING + 2)
        if line_end < 0 or body[line_start:line_end].strip(b" \t"):
            raise InvalidMultipart("invalid multipart body: a boundary line does not end in CRLF")
        header_room = MAX_PART_HEADER_BYTES - header_bytes + 4
        headers_end = body.find(b"\r\n\r\n", line_end, line_end + header_room)
        if headers_end < 0:
            raise InvalidMultipart(f"invalid multipart body: its parts' headers do not end within "
                                   f"{MAX_PART_HEADER_BYTES} bytes in all")
        header_bytes += headers_end - line_end
        next_delimiter = body.find(between, headers_end + 4)
        if next_delimiter < 0:
            raise InvalidMultipart("invalid multipart body: it ends before its closing boundary")
        if len(parts) == MAX_PARTS:
            raise InvalidMultipart(f"invalid multipart body: more than {MAX_PARTS} parts")
        parts.append(_part(body[line_end + 2:headers_end], view[headers_end + 4:next_delimiter]))
        position = next_delimiter + 2


def parameters(header_value: str) -> dict[str, str]:
    """A header's `; name=value` parameters, names lower-cased, quotes and escapes removed."""
    found = {}
    for name, value in PARAMETER.findall(header_value):
        value = value.strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:].removesuffix('"'))
        found[name.lower()] = value
    return found


def _after_crlf(position: int) -> int:
    return position if position < 0 else position + 2


def _part(headers: bytes, content: memoryview) -> Part:
    disposition = None
    for line in headers.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"content-disposition":
            disposition = value.decode("utf-8", "replace")
    if disposition is None:
        raise InvalidMultipart("invalid multipart body: a part has no Content-Disposition header")
    given = parameters(disposition)
    return Part(given.get("name"), "filename" in given or "filename*" in given, content)
