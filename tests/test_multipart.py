"""The multipart/form-data splitter on its own: the parts of what browsers, curl and httpx send, a
clear `invalid_multipart` for a broken body, and a cost per byte that no content can raise."""
import os
import time

import httpx
import pytest

from service.errors import InvalidMultipart
from service.protocols.multipart import MAX_PARTS, form_parts

BOUNDARY = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def one_file(content: bytes, disposition: str = 'form-data; name="file"; filename="a.jpg"') -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/jpeg\r\n\r\n"
            .encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode())


def test_the_parts_of_an_httpx_upload_come_back_as_sent():
    file = b"\x89PNG\r\n--not the boundary\r\n"
    request = httpx.Request("POST", "http://test/", data={"note": "hi"},
                            files={"file": ("cat.png", file, "image/png")})
    parts = form_parts(request.read(), request.headers["content-type"])
    assert [(p.name, p.is_file, bytes(p.content)) for p in parts] == [
        ("note", False, b"hi"), ("file", True, file)]


def test_a_file_named_only_by_rfc_5987_filename_star_is_a_file():
    body = one_file(b"data", "form-data; name=\"file\"; filename*=UTF-8''caf%C3%A9.jpg")
    [part] = form_parts(body, f'multipart/form-data; boundary="{BOUNDARY}"')
    assert part.name == "file" and part.is_file and bytes(part.content) == b"data"


@pytest.mark.parametrize("body, content_type, named", [
    (one_file(b"x"), "multipart/form-data", "Missing boundary"),
    (b"no boundary anywhere", CONTENT_TYPE, "not in it"),
    (one_file(b"x")[:-len(BOUNDARY) - 8], CONTENT_TYPE, "ends before its closing boundary"),
    (f"--{BOUNDARY}\r\nContent-Type: a\r\n\r\nx\r\n--{BOUNDARY}--".encode(), CONTENT_TYPE,
     "no Content-Disposition"),
    (f"--{BOUNDARY}\r\nX: {'a' * 70_000}\r\n\r\nx\r\n--{BOUNDARY}--".encode(), CONTENT_TYPE,
     "headers do not end"),
    (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n'.encode() * (MAX_PARTS + 1)
     + f"--{BOUNDARY}--".encode(), CONTENT_TYPE, f"more than {MAX_PARTS} parts"),
])
def test_a_broken_body_is_refused_naming_what_is_wrong(body, content_type, named):
    with pytest.raises(InvalidMultipart, match=named):
        form_parts(body, content_type)


def test_a_part_made_of_near_boundaries_costs_what_random_bytes_cost():
    """Each near-boundary is the delimiter but for its last byte: a parser that looks at every
    byte that may start the delimiter pays for all of them."""
    near = f"\r\n--{BOUNDARY}"[:-1].encode()
    size = 4_000_000

    def cpu_to_split(content: bytes) -> float:
        started = time.process_time()
        [part] = form_parts(one_file(content), CONTENT_TYPE)
        assert len(part.content) == len(content)
        return time.process_time() - started

    random_cost = min(cpu_to_split(os.urandom(size)) for _ in range(3))
    near_cost = min(cpu_to_split(near * (size // len(near))) for _ in range(3))
    print(f"\n4 MB part: {random_cost * 1000:.1f} ms of random bytes, {near_cost * 1000:.1f} ms of "
          "near-boundaries")
    assert near_cost < 10 * random_cost + 0.01
