"""Anyone can send anything: a battery of bad and odd requests against a real server with its default
limits, each answered with the right status and a message that says what was wrong, never a 500;
and afterwards the same server still gives a normal request the right answer."""
import functools
import http.client
import io
import json
import re
import socket
import struct
import zlib
from dataclasses import dataclass, field

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from contract import Preprocessing
from service.preprocess import preprocess
from tests.image_bombs import png_chunk
from tests.service_fixtures import encode, logged, rss_bytes

MODEL = "mobilenetv3_small"
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024  # the documented defaults the server runs with here
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
HUNDRED_MB = 100 * 1024 * 1024
UNDECODABLE = "could not decode image: not an image format Pillow recognises"
ACCEPTED = "multipart/form-data with the image in field 'file'"


@pytest.fixture(scope="module")
def server(served):
    return served([MODEL])


# Inputs ------------------------------------------------------------------------------------------
@functools.cache
def grayscale_png(width: int, height: int, rows: int) -> bytes:
    """A black 8-bit grayscale PNG declaring width x height; `rows` rows of pixel data are stored."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * ((width + 1) * rows), 9)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels)
            + png_chunk(b"IEND", b""))


@dataclass
class Case:
    method: str
    send: dict = field(default_factory=dict)  # httpx arguments: content, files, params, headers
    path: str = f"/predict/{MODEL}"
    status: int = 200
    message: str | None = None  # the error's exact text, or its start when it ends with "..."
    image: dict | None = None  # for a 200: the size and format the service reports
    twin: str | None = None  # for a 200: another case whose predictions must be the same


def cases(photo: bytes) -> dict[str, Case]:
    cat = Image.open(io.BytesIO(photo)).convert("RGB")
    w, h = cat.size
    png = encode(cat, "PNG")
    corrupt_header = photo[:2] + b"\x00" * 40 + photo[42:]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored turned, shown upright after 90 degrees clockwise
    sixteen_bit = Image.fromarray(np.asarray(cat.convert("L")).astype(np.uint16) * 257)  # 0..65535
    palette = cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    two_frames = [cat.convert("P", palette=Image.Palette.ADAPTIVE), cat.rotate(180).convert("P")]
    return {
        "empty body": Case("PUT", {"content": b""}, status=400,
                           message="empty body: send the image bytes"),
        "zero-byte file": Case("POST", {"files": {"file": ("cat.jpg", b"", "image/jpeg")}}, status=400,
                               message="empty body: send the image bytes"),
        "text file named .jpg": Case("POST", {"files": {"file": ("cat.jpg", b"milk, eggs\n", "image/jpeg")}},
                                     status=400, message=UNDECODABLE),
        "truncated JPEG": Case("PUT", {"content": photo[: len(photo) // 2]}, status=400,
                               message="could not decode image: OSError: image file is truncated..."),
        "truncated PNG": Case("PUT", {"content": png[: len(png) // 2]}, status=400,
                              message="could not decode image: OSError: image file is truncated"),
        "JPEG with a corrupt header": Case("PUT", {"content": corrupt_header}, status=400, message=UNDECODABLE),
        "PNG that decodes to 100 MP": Case(
            "PUT", {"content": grayscale_png(10_000, 10_001, 10_001)}, status=413,
            message=f"image too large (10000x10001 = 100010000 pixels): the limit is "
                    f"{DEFAULT_MAX_IMAGE_PIXELS} pixels (MAX_IMAGE_PIXELS)"),
        "PNG declaring 400 MP (Pillow's own bomb guard)": Case(
            "PUT", {"content": grayscale_png(20_000, 20_000, 1)}, status=413,
            message=f"image too large (decompression bomb): the limit is {DEFAULT_MAX_IMAGE_PIXELS} "
                    "pixels (MAX_IMAGE_PIXELS)"),
        "1x1 image": Case("PUT", {"content": encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG")},
                          image={"width": 1, "height": 1, "format": "PNG"}),
        "20000x20 strip": Case("PUT", {"content": encode(cat.resize((20_000, 20)), "PNG")},
                               image={"width": 20_000, "height": 20, "format": "PNG"}),
        "CMYK JPEG": Case("PUT", {"content": encode(cat.convert("CMYK"), "JPEG", quality=95)},
                          image={"width": w, "height": h, "format": "JPEG"}),
        "16-bit grayscale PNG": Case("PUT", {"content": encode(sixteen_bit, "PNG")},
                                     image={"width": w, "height": h, "format": "PNG"},
                                     twin="8-bit grayscale PNG"),
        "8-bit grayscale PNG": Case("PUT", {"content": encode(cat.convert("L"), "PNG")},
                                    image={"width": w, "height": h, "format": "PNG"}),
        "palette PNG with transparency": Case(
            "PUT", {"content": encode(palette, "PNG", transparency=0)},
            image={"width": w, "height": h, "format": "PNG"}),
        "animated GIF": Case("PUT", {"content": encode(two_frames[0], "GIF", save_all=True,
                                                       append_images=two_frames[1:], duration=100)},
                             image={"width": w, "height": h, "format": "GIF"}, twin="its first frame"),
        "its first frame": Case("PUT", {"content": encode(two_frames[0], "GIF")},
                                image={"width": w, "height": h, "format": "GIF"}),
        "multi-page TIFF": Case("PUT", {"content": encode(cat, "TIFF", save_all=True,
                                                          append_images=[cat.rotate(180)])},
                                image={"width": w, "height": h, "format": "TIFF"}, twin="its first page"),
        "its first page": Case("PUT", {"content": encode(cat, "TIFF")},
                               image={"width": w, "height": h, "format": "TIFF"}),
        "EXIF-rotated JPEG": Case("PUT", {"content": encode(cat, "JPEG", exif=exif)},
                                  image={"width": h, "height": w, "format": "JPEG"}),
        "SVG bytes": Case("POST", {"content": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                                   "headers": {"Content-Type": "image/svg+xml"}}, status=400, message=UNDECODABLE),
        "HTML bytes": Case("PUT", {"content": b"<!doctype html><html><body>a cat</body></html>"},
                           status=400, message=UNDECODABLE),
        "PDF bytes": Case("PUT", {"content": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"},
                          status=400, message=UNDECODABLE),
        "wrong form field name": Case("POST", {"files": {"image": ("cat.jpg", photo)}}, status=422,
                                      message="multipart body has no file in field 'file' (fields sent: image)"),
        "two files": Case("POST", {"files": [("file", ("a.jpg", photo)), ("file", ("b.jpg", photo))]},
                          status=422, message="multipart body has 2 files in field 'file'; send exactly one"),
        "multipart without a boundary": Case("POST", {"content": photo, "headers": {
            "Content-Type": "multipart/form-data"}}, status=400, message="Missing boundary in multipart."),
        "wrong content type": Case("POST", {"content": photo, "headers": {"Content-Type": "text/plain"}},
                                   status=415, message="unsupported Content-Type 'text/plain'"),
        "JSON instead of an image": Case("POST", {"json": {"image": "cat.jpg"}}, status=415,
                                         message="unsupported Content-Type 'application/json'"),
        "unknown model": Case("PUT", {"content": photo}, path="/predict/resnet50", status=404,
                              message=f"unknown model 'resnet50'; valid names: {MODEL}"),
        "../ in the model name": Case("PUT", {"content": photo}, path="/predict/../../etc/passwd",
                                      status=404, message="no route /predict/../../etc/passwd; see /docs"),
        ".. as the model name": Case("PUT", {"content": photo}, path="/predict/..", status=404,
                                     message=f"unknown model '..'; valid names: {MODEL}"),
        "URL-encoded ../": Case("PUT", {"content": photo}, path="/predict/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                                status=404, message="no route /predict/../../etc/passwd; see /docs"),
        "URL-encoded ..": Case("PUT", {"content": photo}, path="/predict/%2E%2E", status=404,
                               message=f"unknown model '..'; valid names: {MODEL}"),
        "URL-encoded ../ before a real model": Case(
            "PUT", {"content": photo}, path=f"/predict/..%2F{MODEL}", status=404,
            message=f"no route /predict/../{MODEL}; see /docs"),
        "NUL byte in the model name": Case("PUT", {"content": photo}, path=f"/predict/{MODEL}%00",
                                           status=404, message=f"unknown model '{MODEL}\\x00'..."),
        "huge top_k": Case("PUT", {"content": photo, "params": {"top_k": 10**30}}, status=422,
                           message=f"top_k must be between 1 and 1000 (the model's class count), got {10**30}"),
        "negative top_k": Case("PUT", {"content": photo, "params": {"top_k": -3}}, status=422,
                               message="top_k must be between 1 and 1000 (the model's class count), got -3"),
        "non-integer top_k": Case("PUT", {"content": photo, "params": {"top_k": "five"}}, status=422,
                                  message="invalid request: query.top_k: Input should be a valid integer..."),
        "fractional top_k": Case("PUT", {"content": photo, "params": {"top_k": "2.5"}}, status=422,
                                 message="invalid request: query.top_k: Input should be a valid integer..."),
        "unsupported method": Case("DELETE", status=405,
                                   message=f"method DELETE not allowed on /predict/{MODEL}; allowed: POST, PUT"),
    }


@pytest.fixture(scope="module")
def battery(photos) -> dict[str, Case]:
    return cases(photos["chelsea"].read_bytes())


@pytest.fixture(scope="module")
def answers(client, battery) -> dict[str, httpx.Response]:
    return {name: send(client, case) for name, case in battery.items()}


def send(client: httpx.Client, case: Case) -> httpx.Response:
    if ".." in case.path or "%" in case.path:  # httpx would tidy the path; send it byte for byte
        connection = http.client.HTTPConnection(client.base_url.host, client.base_url.port, timeout=30)
        connection.request(case.method, case.path, body=case.send.get("content"))
        raw = connection.getresponse()
        response = httpx.Response(raw.status, headers=raw.getheaders(), content=raw.read())
        connection.close()
        return response
    return client.request(case.method, case.path, **case.send)


def expect_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if message.endswith("..."):
        assert error.startswith(message[:-3]), error
    else:
        assert error == message


# The battery -------------------------------------------------------------------------------------
def case_names() -> list[str]:
    blank = Image.new("RGB", (8, 8))
    return list(cases(encode(blank, "JPEG")).keys())


@pytest.mark.parametrize("name", case_names())
def test_each_bad_or_odd_upload_gets_its_status_and_a_message_saying_why(name, battery, answers):
    case, response = battery[name], answers[name]
    if case.status != 200:
        expect_error(response, case.status, case.message)
        return
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == case.image
    assert len(body["predictions"]) == 5
    if case.twin:
        twin = answers[case.twin].json()["predictions"]
        assert [p["class_id"] for p in body["predictions"]] == [p["class_id"] for p in twin]
        np.testing.assert_allclose([p["probability"] for p in body["predictions"]],
                                   [p["probability"] for p in twin], rtol=1e-5)


def test_the_battery_has_more_than_25_kinds_and_none_got_a_500(answers):
    assert len(answers) >= 25
    assert {n: r.status_code for n, r in answers.items() if r.status_code >= 500} == {}


def test_a_100_mb_body_is_refused_from_its_content_length_before_it_is_sent(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(f"PUT /predict/{MODEL} HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                           f"Content-Length: {HUNDRED_MB}\r\n\r\n".encode() + b"\xff" * 65536)
        head, body = receive_response(connection)  # 64 KB of 100 MB sent: no wait for the rest
    assert head.startswith(b"HTTP/1.1 413 ")
    refusal = json.loads(body)
    assert refusal["code"] == "body_too_large" and refusal["limit_bytes"] == DEFAULT_MAX_BODY_BYTES
    assert str(DEFAULT_MAX_BODY_BYTES) in refusal["error"]


def test_a_100_mb_chunked_body_is_cut_off_at_the_limit_without_being_held_in_memory(server):
    before = rss_bytes(server.process.pid)
    chunk = b"\xff" * 2**20
    response = httpx.put(f"{server.url}/predict/{MODEL}", content=(chunk for _ in range(100)), timeout=60)
    grown = rss_bytes(server.process.pid) - before
    print(f"\nRSS growth while a 100 MB chunked upload was refused: {grown / 2**20:.1f} MiB")
    expect_error(response, 413, f"request body larger than the limit of {DEFAULT_MAX_BODY_BYTES} "
                                "bytes (MAX_BODY_BYTES)")
    assert grown < HUNDRED_MB / 2


def receive_response(connection: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])
    while len(body) < length:
        body += connection.recv(65536)
    return head, body


# Request ids and the log -------------------------------------------------------------------------
def test_a_sane_request_id_is_echoed_and_logged_and_an_unsafe_one_replaced(client, server, photos):
    image = photos["rocket"].read_bytes()
    echoed = client.put(f"/predict/{MODEL}", content=image, headers={"X-Request-ID": "order-42.a:b"})
    assert echoed.headers["X-Request-ID"] == "order-42.a:b"
    for unsafe in ("has space", "x" * 129, "new\tline"):
        replaced = client.put(f"/predict/{MODEL}", content=image, headers={"X-Request-ID": unsafe})
        assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["X-Request-ID"]), unsafe
    generated = {client.get("/health/live").headers["X-Request-ID"] for _ in range(3)}
    assert len(generated) == 3
    log = logged(server, "GET /health/live request_id=(" + "|".join(generated) + ")")
    assert re.search(rf"PUT /predict/{MODEL} request_id=order-42\.a:b model={MODEL} status=200 ", log)
    assert f"request_id={replaced.headers['X-Request-ID']} model={MODEL} status=200" in log
    assert "has space" not in log


def test_errors_carry_a_request_id_too(answers):
    assert all(re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"]) for r in answers.values())


def test_a_newline_in_the_path_cannot_forge_a_log_line(client, server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/predict/%0d%0aINFO%20forged")
    assert connection.getresponse().status == 405
    text = logged(server, r"GET .*INFO forged.* status=405")  # the request's own line, quoted
    assert not any(line.startswith("INFO forged") for line in text.splitlines())


def test_cors_headers_are_absent_unless_configured(client):
    response = client.options(f"/predict/{MODEL}", headers={
        "Origin": "https://example.org", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in response.headers


# And afterwards ----------------------------------------------------------------------------------
def test_after_the_battery_a_normal_request_still_gets_the_right_answer(client, server, answers,
                                                                        model_repository, photos):
    image = photos["astronaut"].read_bytes()
    meta = json.loads((model_repository / MODEL / "metadata.json").read_text())
    session = ort.InferenceSession(str(model_repository / MODEL / meta["model_file"]),
                                   providers=["CPUExecutionProvider"])
    x = preprocess(image, Preprocessing(**meta["preprocessing"]), 10**9)
    logits = session.run(None, {meta["input"]["name"]: x})[0][0].astype(np.float64)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    body = client.post(f"/predict/{MODEL}", files={"file": ("astronaut.jpg", image)}).json()
    assert [p["class_id"] for p in body["predictions"]] == np.argsort(-expected)[:5].tolist()
    np.testing.assert_allclose([p["probability"] for p in body["predictions"]],
                               np.sort(expected)[::-1][:5], rtol=1e-4, atol=1e-6)
    assert "Traceback" not in server.log.read_text()
