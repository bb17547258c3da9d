"""The server against hostile input: every endpoint and the websocket, decode bombs made here,
a hostile HTTP server on 127.0.0.1 for audio_url fetches, slow clients, a full server.

Each case asserts its status (or event) and an OpenAI-shaped body with ``param`` where a
field is at fault; afterwards the server still transcribes exactly as offline, on the same
keep-alive connection, and its memory grew no more than the limits allow.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import socket
import socketserver
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
websockets = pytest.importorskip("websockets")

import soundfile as sf  # noqa: E402

import mlx_voxtral  # noqa: E402
from mlx_voxtral.audio import load_audio  # noqa: E402
from mlx_voxtral.audio_url import SourcePolicy  # noqa: E402
from mlx_voxtral.server.app import create_app  # noqa: E402
from mlx_voxtral.server.protocol import uvicorn_settings  # noqa: E402

from serving import Served, chat_body, data_url, realtime, rss_bytes, write_wav  # noqa: E402

MAX_UPLOAD = 1024 * 1024
MAX_SECONDS = 12.0
API_KEY = "k3y"


# hostile HTTP server for fetches ----------------------------------------------------------
class Hostile(http.server.BaseHTTPRequestHandler):
    """Paths: /audio.wav (a real WAV), /redirect-ftp, /redirect-loop, /missing (404),
    /trickle (one byte a second), /huge (Content-Length over the cap), /endless (no length,
    more than the cap), /to-audio (a redirect to /audio.wav)."""

    wav = b""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        if path == "/audio.wav":
            self._send(200, self.wav)
        elif path == "/to-audio":
            self._redirect("/audio.wav")
        elif path == "/redirect-ftp":
            self._redirect("ftp://127.0.0.1/audio.wav")
        elif path == "/redirect-loop":
            self._redirect("/redirect-loop")
        elif path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b"R")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.5)
        elif path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(50 * MAX_UPLOAD))
            self.end_headers()
        elif path == "/endless":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(4 * 1024):
                    self.wfile.write(b"\0" * 1024)
            except OSError:
                pass
        else:
            self._send(404, b"secret internal page")

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture(scope="module")
def hostile_http(clips):
    Hostile.wav = Path(clips["speech_1s"]).read_bytes()
    httpd = _ThreadingServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def garbage_tcp():
    """A TCP server that answers anything with bytes that are not HTTP."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"\x00\x01garbage that is not HTTP\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# audio made here --------------------------------------------------------------------------
def wav_bytes(audio: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def wav_header_bomb(rate: int = 1, seconds: int = 3600) -> bytes:
    """A small WAV whose header claims ``seconds`` of 16-bit mono at ``rate`` Hz."""
    frames = rate * seconds
    data = np.zeros(min(frames, 3000), np.int16).tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + 2 * frames) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16) + b"data" + struct.pack("<I", 2 * frames)
    return header + data


def flac_of_silence(seconds: float) -> bytes:
    """A FLAC of silence at 8 kHz (hours of it compress to a few hundred KiB), written a
    minute at a time."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", 8000, 1, "PCM_16", format="FLAC") as f:
        minute = np.zeros(60 * 8000, np.int16)
        for _ in range(int(seconds // 60)):
            f.write(minute)
    return buf.getvalue()


HOURS_OF_SILENCE = flac_of_silence(3 * 3600)


@pytest.fixture(scope="module")
def clips(speech_5s, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("hostile_audio")
    speech = load_audio(speech_5s)
    out = {"allowed": folder / "allowed"}
    out["allowed"].mkdir()
    out["speech_1s"] = write_wav(out["allowed"] / "speech_1s.wav", speech[:16000])
    out["speech_2s"] = write_wav(folder / "speech_2s.wav", speech[:32000])
    out["secret"] = folder / "secret.txt"
    out["secret"].write_text("not for clients\n")
    return out


@pytest.fixture(scope="module")
def refs(model_fp32, clips) -> dict:
    out = {n: mlx_voxtral.transcribe(model_fp32, clips[n]) for n in ("speech_1s", "speech_2s")}
    pcm = np.round(np.clip(load_audio(clips["speech_2s"]), -1, 1) * 32767).astype(np.int16)
    out["pcm16"] = pcm
    out["live"] = mlx_voxtral.transcribe(model_fp32, pcm.astype(np.float32) / 32768.0)
    return out


def make_app(model, clips, **overrides):
    policy = SourcePolicy(local_root=str(clips["allowed"]), allow_remote=True, max_bytes=MAX_UPLOAD,
                          timeout=2.0, allow_private_addresses=overrides.pop("private", False),
                          allowed_domains=overrides.pop("domains", ()))
    settings = dict(model_name="default", policy=policy, max_upload_bytes=MAX_UPLOAD, max_audio_seconds=MAX_SECONDS,
                    max_concurrency=4, max_queue=4, max_live=2, live_idle_timeout=1.5, max_live_seconds=6.0,
                    live_backlog_seconds=2.0, body_timeout=2.0, allowed_origins=["http://allowed.example"])
    settings.update(overrides)
    return create_app(model, **settings)


@pytest.fixture(scope="module")
def server(model_fp32, clips, refs):
    served = Served(make_app(model_fp32, clips), **uvicorn_settings(header_timeout=1.0))
    yield served
    served.close()


@pytest.fixture(scope="module")
def private_server(model_fp32, clips, refs):
    """Remote fetches may reach private addresses (how the hostile server is reached)."""
    served = Served(make_app(model_fp32, clips, private=True))
    yield served
    served.close()


def check(response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "0x" not in error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def post_chat(server, body, **kwargs):
    return server.http.post("/v1/chat/completions", json=body, **kwargs)


def audio_part(url: str) -> dict:
    return {"type": "audio_url", "audio_url": {"url": url}}


def messages(*parts) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": list(parts)}]}


def b64_data(data: bytes, mime: str = "audio/wav") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# chat completions: bodies and fields ---------------------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000

RAW_BODIES = [  # (body bytes, content type, status, code)
    (b"{not json", "application/json", 400, "invalid_json"),
    (DEEP.encode(), "application/json", 400, "invalid_json"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json", 400, "invalid_json"),
    (b"[1, 2, 3]", "application/json", 400, "invalid_json"),
    (b"", "application/json", 400, "invalid_json"),
    (b"\xff\xfe\x00bad utf", "application/json", 400, "invalid_json"),
    (b'{"messages": []}', None, 415, "unsupported_media_type"),
    (b'{"messages": []}', "", 415, "unsupported_media_type"),
    (b'{"messages": []}', "text/plain", 415, "unsupported_media_type"),
    (b'{"messages": []}', "multipart/form-data; boundary=x", 415, "unsupported_media_type"),
]


@pytest.mark.parametrize("body, content_type, status, code", RAW_BODIES)
def test_raw_bodies(server, body, content_type, status, code):
    headers = {} if content_type is None else {"content-type": content_type}
    check(server.http.post("/v1/chat/completions", content=body, headers=headers), status, code=code)


def _body(**fields):
    return {"model": "default", "messages": [{"role": "user", "content": [audio_part("{speech}")]}], **fields}


FIELD_CASES = [  # (body, status, param)
    ({"model": "default"}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [42]}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 12}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [7]}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "only text"}]}]}, 400, "messages"),
    (messages({"type": "audio_url", "audio_url": 5}), 400, "messages"),
    (messages({"type": "audio_url", "audio_url": {"link": "x"}}), 400, "messages"),
    (messages(audio_part("")), 400, "messages"),
    (messages(audio_part("data:audio/wav;base64")), 400, "messages"),
    (messages(audio_part("data:text/html;base64,PGI+")), 400, "messages"),
    (messages(audio_part("data:audio/wav,plain")), 400, "messages"),
    (messages(audio_part("data:audio/wav;base64,!!!")), 400, "messages"),
    (messages({"type": "input_audio", "input_audio": "x"}), 400, "messages"),
    (messages({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}), 400, "messages"),
    (messages({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}), 400, "messages"),
    (messages({"type": "input_audio", "input_audio": {"data": "AAAA", "format": 3}}), 400, "messages"),
    (messages(audio_part("file://example.com/etc/passwd")), 400, "messages"),
    (messages(audio_part("ftp://127.0.0.1/a.wav")), 400, "messages"),
    (messages(audio_part("gopher://127.0.0.1/a")), 400, "messages"),
    (messages(audio_part("/tmp/with\x00nul.wav")), 400, "messages"),
    (messages(audio_part("/" + "a" * 5000)), 400, "messages"),
    (messages(audio_part("http://127.0.0.1/a\r\nX-Injected: 1")), 400, "messages"),
    (_body(temperature=-1), 400, "temperature"),
    (_body(temperature=2.5), 400, "temperature"),
    (_body(temperature="hot"), 400, "temperature"),
    (_body(temperature=True), 400, "temperature"),
    (_body(max_tokens=0), 400, "max_tokens"),
    (_body(max_tokens=-5), 400, "max_tokens"),
    (_body(max_tokens=10**9), 400, "max_tokens"),
    (_body(max_tokens="many"), 400, "max_tokens"),
    (_body(max_tokens=True), 400, "max_tokens"),
    (_body(max_completion_tokens=1.5), 400, "max_tokens"),
    (_body(n=2), 400, "n"),
    (_body(seed="lucky"), 400, "seed"),
    (_body(seed=2**70), 400, "seed"),
    (_body(seed=-(2**64)), 400, "seed"),
    (_body(seed=False), 400, "seed"),
    (_body(stream="yes"), 400, "stream"),
    (_body(stream_options=[1]), 400, "stream_options"),
    (_body(model=7), 400, "model"),
    (_body(delay_ms=100), 400, "delay_ms"),
    (_body(delay_ms="slow"), 400, "delay_ms"),
    (_body(delay_ms=10**6), 400, "delay_ms"),
]


@pytest.mark.parametrize("body, status, param", FIELD_CASES)
def test_fields(server, clips, body, status, param):
    body = json.loads(json.dumps(body).replace("{speech}", data_url(clips["speech_1s"])))
    check(post_chat(server, body), status, param=param)


def test_nan_temperature_is_rejected(server, clips):
    body = json.dumps(_body(temperature=0)).replace('"temperature": 0', '"temperature": NaN')
    body = body.replace("{speech}", data_url(clips["speech_1s"]))
    check(server.http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}),
          400, param="temperature")


def test_negative_seed_is_a_64_bit_integer(server, clips):
    r = post_chat(server, chat_body(data_url(clips["speech_1s"]), seed=-1, temperature=0.5))
    assert r.status_code == 200, r.text


# chat completions: local files --------------------------------------------------------------
def test_local_files(server, clips, refs):
    inside = clips["allowed"] / "speech_1s.wav"
    r = post_chat(server, chat_body(str(inside)))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == refs["speech_1s"].text
    for path in (str(clips["secret"]), str(clips["allowed"] / ".." / "secret.txt"), "/etc/passwd",
                 f"file://{clips['secret']}"):
        error = check(post_chat(server, chat_body(path)), 403, param="messages", code="forbidden_source")
        assert str(clips["allowed"]) not in error["message"]
    check(post_chat(server, chat_body(str(clips["allowed"] / "missing.wav"))), 400, param="messages")
    check(post_chat(server, chat_body(str(clips["allowed"]))), 400, param="messages")


# decode bombs and bad audio -----------------------------------------------------------------
def _audio_case(data: bytes) -> dict:
    return messages({"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}})


AUDIO_CASES = [  # (name, bytes, status, code)
    ("garbage", b"this is not audio at all" * 40, 415, "unsupported_audio_format"),
    ("wav header only", wav_bytes(np.zeros(0, np.int16)), 400, "invalid_audio"),
    ("1 Hz hour", wav_header_bomb(1, 3600), 415, "unsupported_audio_format"),
    ("100 Hz hour", wav_header_bomb(100, 3600), 415, "unsupported_audio_format"),
    ("flac, 3 hours of silence", HOURS_OF_SILENCE, 400, "audio_too_long"),
    ("flac, a minute of silence", flac_of_silence(60), 400, "audio_too_long"),
    ("nan float wav", wav_bytes(np.array([0.1, np.nan, 0.2] * 1000, np.float32), subtype="FLOAT"), 400,
     "invalid_audio"),
    ("truncated wav", wav_bytes(np.zeros(16000, np.int16))[:60], 400, None),
    ("mp3 garbage", b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb" + b"\x00" * 500, 415, None),
]


@pytest.mark.parametrize("name, data, status, code", AUDIO_CASES, ids=[c[0] for c in AUDIO_CASES])
def test_bad_audio(server, name, data, status, code):
    r = post_chat(server, _audio_case(data))
    if status == 400 and code is None and r.status_code == 415:  # either is right for a broken file
        status = 415
    check(r, status, param=None, code=code)


def test_request_limit_is_summed_over_parts(server, clips):
    wav = data_url(write_wav(clips["allowed"].parent / "five.wav", np.zeros(5 * 16000, np.float32)))
    r = post_chat(server, chat_body(wav, wav))  # 10 s: under the 12 s limit
    assert r.status_code == 200, r.text
    check(post_chat(server, chat_body(wav, wav, wav)), 400, code="audio_too_long")  # 15 s


def test_upload_limits(server):
    big = base64.b64encode(b"\0" * (MAX_UPLOAD + 10)).decode()
    check(post_chat(server, messages(audio_part(f"data:audio/wav;base64,{big}"))), 413)
    check(server.http.post("/v1/chat/completions", content=b"x" * (3 * MAX_UPLOAD),
                           headers={"content-type": "application/json"}), 413, code="request_too_large")

    def chunks():
        for _ in range(48):
            yield b" " * 65536
    check(server.http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}),
          413, code="request_too_large")


def test_decode_bombs_stay_small(server):
    """Four bombs at once: answered with their errors, the server's memory barely moves."""
    before = rss_bytes()

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            bodies = [_audio_case(HOURS_OF_SILENCE)] * 2 + [_audio_case(wav_header_bomb(1, 3600)),
                                                            _audio_case(flac_of_silence(120))]
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))

    for r in asyncio.run(run()):
        assert r.status_code in (400, 415), r.text
    assert rss_bytes() - before < 100 * 2**20


# routes, methods, hosts, keys ---------------------------------------------------------------
@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/chat/completions", 405), ("PUT", "/v1/audio/transcriptions", 405), ("GET", "/nope", 404),
    ("DELETE", "/v1/models", 405), ("GET", "/v1/realtime", 404), ("POST", "/health", 405),
    ("POST", "/", 405), ("GET", "/static/nope.js", 404), ("GET", "/static/../app.py", 404),
    ("GET", "/static/%2e%2e/app.py", 404), ("POST", "/static/page.js", 405),
])
def test_routes(server, method, path, status):
    check(server.http.request(method, path), status)


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.nip.io", "localhost.evil.example:1234", "[::2]"])
def test_foreign_host_is_refused(server, host):
    check(server.http.get("/health", headers={"host": host}), 400, code="invalid_host")


def test_loopback_hosts_are_served(server):
    for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", "[::1]:80"):
        assert server.http.get("/health", headers={"host": host}).status_code == 200


@pytest.fixture(scope="module")
def keyed(model_fp32, clips, refs):
    served = Served(make_app(model_fp32, clips, api_key=API_KEY))
    yield served
    served.close()


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer nope"}, {"authorization": f"Basic {API_KEY}"},
                                     {"authorization": API_KEY}, {"authorization": "Bearer"}])
def test_api_key(keyed, headers):
    check(keyed.http.get("/v1/models", headers=headers), 401, code="invalid_api_key")
    check(keyed.http.post("/v1/chat/completions", json={}, headers=headers), 401)
    assert keyed.http.get("/health").status_code == 200


# transcriptions -----------------------------------------------------------------------------
def _form(server, files=None, data=None, headers=None):
    return server.http.post("/v1/audio/transcriptions", files=files, data=data, headers=headers)


@pytest.mark.parametrize("data, file, status, param", [
    ({}, None, 400, "file"),
    ({"file": "not a file"}, None, 400, "file"),
    ({"response_format": "docx"}, "speech", 400, "response_format"),
    ({"temperature": "1.5"}, "speech", 400, "temperature"),
    ({"temperature": "warm"}, "speech", 400, "temperature"),
    ({"temperature": "-0.1"}, "speech", 400, "temperature"),
    ({"stream": "maybe"}, "speech", 400, "stream"),
    ({"stream": "true", "response_format": "srt"}, "speech", 400, "response_format"),
    ({"timestamp_granularities[]": "char"}, "speech", 400, "timestamp_granularities"),
    ({"delay_ms": "100"}, "speech", 400, "delay_ms"),
    ({"delay_ms": "soon"}, "speech", 400, "delay_ms"),
    ({}, "empty", 400, None),
    ({}, "garbage", 415, None),
    ({}, "bomb", 415, None),
])
def test_transcription_fields(server, clips, data, file, status, param):
    files = None
    if file == "speech":
        files = {"file": ("a.wav", Path(clips["speech_1s"]).read_bytes(), "audio/wav")}
    elif file == "empty":
        files = {"file": ("a.wav", b"", "audio/wav")}
    elif file == "garbage":
        files = {"file": ("a.wav", b"garbage" * 100, "audio/wav")}
    elif file == "bomb":
        files = {"file": ("a.wav", wav_header_bomb(1, 3600), "audio/wav")}
    check(_form(server, files=files, data=data), status, param=param)


def test_transcription_content_types(server):
    check(server.http.post("/v1/audio/transcriptions", json={"file": "x"}), 415, code="unsupported_media_type")
    check(server.http.post("/v1/audio/transcriptions", content=b"--x\r\nbroken",
                           headers={"content-type": "multipart/form-data; boundary=x"}), 400)
    fields = {f"f{i}": "v" for i in range(100)}
    check(_form(server, data=fields), 400)


def test_model_field_as_a_file_is_refused(server, clips):
    files = {"file": ("a.wav", Path(clips["speech_1s"]).read_bytes(), "audio/wav"), "model": ("m.txt", b"x")}
    check(_form(server, files=files), 400)


# remote fetches -----------------------------------------------------------------------------
def test_private_addresses_are_refused(server, hostile_http):
    port = hostile_http.rsplit(":", 1)[1]
    for url in (f"{hostile_http}/audio.wav", f"http://2130706433:{port}/audio.wav",
                f"http://0x7f000001:{port}/audio.wav", f"http://0177.0.0.1:{port}/audio.wav",
                f"http://[::1]:{port}/audio.wav", f"http://localhost:{port}/audio.wav",
                f"http://[::ffff:127.0.0.1]:{port}/audio.wav", "http://169.254.169.254/latest/meta-data/",
                "http://10.0.0.1/a.wav", "http://0.0.0.0/a.wav"):
        error = check(post_chat(server, chat_body(url)), 403, param="messages", code="forbidden_source")
        assert port not in error["message"]


def test_fetches_that_fail_say_little(private_server, hostile_http, garbage_tcp):
    cases = [
        (f"{hostile_http}/missing", 400, "fetch_failed"),
        (f"{hostile_http}/redirect-ftp", 403, "forbidden_source"),
        (f"{hostile_http}/redirect-loop", 400, "fetch_failed"),
        (f"http://127.0.0.1:{closed_port()}/a.wav", 400, "fetch_failed"),
        (garbage_tcp + "/a.wav", 400, "fetch_failed"),
        (f"{hostile_http}/huge", 413, "request_too_large"),
        (f"{hostile_http}/endless", 413, "request_too_large"),
        ("http://no-such-host.invalid/a.wav", 400, "fetch_failed"),
    ]
    for url, status, code in cases:
        error = check(post_chat(private_server, chat_body(url)), status, param="messages", code=code)
        for leak in ("404", "refused", "Errno", "secret", "garbage", "ftp"):
            assert leak not in error["message"], (url, error)


def test_a_trickling_server_meets_the_deadline(private_server, hostile_http):
    start = time.monotonic()
    check(post_chat(private_server, chat_body(f"{hostile_http}/trickle")), 400, code="fetch_failed")
    assert time.monotonic() - start < 6  # the 2 s deadline covers the whole fetch


def test_a_good_fetch_and_a_redirect(private_server, hostile_http, refs):
    for path in ("/audio.wav", "/to-audio"):
        r = post_chat(private_server, chat_body(hostile_http + path))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == refs["speech_1s"].text


def test_domain_allowlist(model_fp32, clips, hostile_http):
    served = Served(make_app(model_fp32, clips, private=True, domains=("example.com",)))
    try:
        check(post_chat(served, chat_body(f"{hostile_http}/audio.wav")), 403, code="forbidden_source")
    finally:
        served.close()


def test_slow_fetches_do_not_stall_the_engine(private_server, hostile_http, clips, refs):
    """Trickling fetches wait on their own pool; a request with inline audio is answered meanwhile."""

    async def run():
        async with httpx.AsyncClient(base_url=private_server.url, timeout=60) as client:
            slow = [asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(f"{hostile_http}/trickle")))
                    for _ in range(3)]
            await asyncio.sleep(0.2)
            start = time.monotonic()
            fast = await client.post("/v1/chat/completions", json=chat_body(data_url(clips["speech_1s"])))
            took = time.monotonic() - start
            await asyncio.gather(*slow)
            return fast, took

    fast, took = asyncio.run(run())
    assert fast.status_code == 200 and fast.json()["choices"][0]["message"]["content"] == refs["speech_1s"].text
    assert took < 2.0


# admission, slow clients, keep-alive ----------------------------------------------------------
def _http(sock: socket.socket, request: bytes) -> tuple[int, dict, bytes]:
    """One request on an open connection: (status, headers, body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def _post(path: str, body: bytes, content_type: str = "application/json", length=None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body) if length is None else length}\r\n\r\n").encode() + body


def test_a_full_server_refuses_before_reading_the_body(model_fp32, clips, refs):
    served = Served(make_app(model_fp32, clips, max_concurrency=1, max_queue=0))
    try:
        async def run():
            async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
                long = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(
                    data_url(clips["speech_2s"]), data_url(clips["speech_2s"]))))
                await asyncio.sleep(0.3)
                sock = socket.create_connection(("127.0.0.1", served.port))
                sock.settimeout(10)
                start = time.monotonic()
                # a body announced at 2 MB of which 13 bytes ever come
                status, headers, body = await asyncio.to_thread(
                    _http, sock, _post("/v1/chat/completions", b'{"messages": ', length=2_000_000))
                took = time.monotonic() - start
                sock.close()
                return status, headers, json.loads(body), took, await long

        status, headers, body, took, long = asyncio.run(run())
        assert status == 429 and headers["retry-after"] == "1"
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "server_busy"
        assert took < 1.0
        assert long.status_code == 200
    finally:
        served.close()


def test_slow_headers_are_cut_off(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    start = time.monotonic()
    sock.settimeout(10)
    for _ in range(20):  # one header line a second, never finished
        try:
            sock.sendall(b"X-Slow: 1\r\n")
            if sock.recv(1024) == b"":
                break
        except (BrokenPipeError, ConnectionResetError):
            break
        except socket.timeout:
            break
        time.sleep(0.2)
    assert time.monotonic() - start < 5
    sock.close()


def test_a_slow_body_times_out(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 b"content-length: 1000\r\n\r\n{\"messages\":")
    sock.settimeout(10)
    reply = sock.recv(4096)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]


def test_errors_keep_the_connection(server, clips, refs):
    """One keep-alive connection answers a malformed request, a bad field, and then a good
    request (an error raised past the app would have dropped it)."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(60)
    assert _http(sock, _post("/v1/chat/completions", DEEP.encode()))[0] == 400
    assert _http(sock, _post("/v1/chat/completions", json.dumps(_body(seed=2**70)).encode()))[0] == 400
    assert _http(sock, _post("/v1/chat/completions", b"{}", content_type="text/plain"))[0] == 415
    status, _, body = _http(sock, _post("/v1/chat/completions", json.dumps(chat_body(data_url(clips["speech_1s"]))).encode()))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == refs["speech_1s"].text
    sock.close()


def test_a_server_fault_is_a_quiet_500(model_fp32, clips, refs, monkeypatch):
    app = make_app(model_fp32, clips)
    served = Served(app)
    try:
        def broken(*args, **kwargs):
            raise RuntimeError("secret detail at 0xdeadbeef")

        monkeypatch.setattr(app.state.api, "open_audio", broken)
        sock = socket.create_connection(("127.0.0.1", served.port))
        sock.settimeout(60)
        status, _, body = _http(sock, _post("/v1/chat/completions", json.dumps(chat_body(data_url(clips["speech_1s"]))).encode()))
        error = json.loads(body)["error"]
        assert status == 500 and error["type"] == "server_error" and "secret" not in error["message"]
        assert _http(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0] == 200  # the same connection
        sock.close()
    finally:
        served.close()


# websocket ------------------------------------------------------------------------------------
WS_BAD = [
    ("{not json", "invalid_json"),
    (DEEP[:20000] + DEEP[-20000:], "invalid_json"),
    (json.dumps([1, 2]), "invalid_request"),
    (json.dumps({"type": "no.such.event"}), None),
    (json.dumps({"type": "input_audio_buffer.append"}), None),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "!!!"}), None),
    (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}), None),
    (json.dumps({"type": "input_audio_buffer.append", "audio": ""}), None),
    (json.dumps({"type": "session.update", "delay_ms": 100}), None),
    (json.dumps({"type": "session.update", "model": 3}), None),
    (json.dumps({"type": "session.update", "session": {"delay_ms": "slow"}}), None),
    (json.dumps({"type": 5}), None),
]


def test_websocket_bad_events_keep_the_session(server, refs):
    async def run():
        async with websockets.connect(server.ws_url + "/v1/realtime", max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            errors = []
            for message in [m for m, _ in WS_BAD] + [b"\x00\x01 binary"]:
                await ws.send(message)
                errors.append(json.loads(await ws.recv()))
            pcm = refs["pcm16"]
            for i in range(0, len(pcm), 1600):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(pcm[i : i + 1600].tobytes()).decode()}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            deltas = []
            while (event := json.loads(await ws.recv()))["type"] in ("transcription.delta", "transcription.word"):
                if event["type"] == "transcription.delta":
                    deltas.append(event["delta"])
            return errors, deltas, event

    errors, deltas, done = asyncio.run(run())
    assert all(e["type"] == "error" and set(e["error"]) == {"message", "type", "param", "code"} for e in errors)
    for e, (_, code) in zip(errors, WS_BAD):
        if code is not None:
            assert e["error"]["code"] == code, e
    assert done["type"] == "transcription.done" and done["text"] == refs["live"].text == "".join(deltas)


@pytest.mark.parametrize("headers, allowed", [
    ({"Origin": "http://evil.example"}, False),
    ({"Origin": "null"}, False),
    ({"Origin": "http://allowed.example"}, True),
    ({}, True),
])
def test_websocket_origins(server, refs, headers, allowed):
    if allowed:
        deltas, done, _ = asyncio.run(realtime(server.ws_url + "/v1/realtime", refs["pcm16"][:8000], headers=headers))
        assert done["type"] == "transcription.done"
    else:
        with pytest.raises(websockets.exceptions.InvalidStatus) as e:
            asyncio.run(realtime(server.ws_url + "/v1/realtime", refs["pcm16"][:8000], headers=headers))
        assert e.value.response.status_code == 403


def test_websocket_same_origin_is_allowed(server, refs):
    origin = {"Origin": f"http://127.0.0.1:{server.port}"}
    _, done, _ = asyncio.run(realtime(server.ws_url + "/v1/realtime", refs["pcm16"][:8000], headers=origin))
    assert done["type"] == "transcription.done"


def test_websocket_foreign_host_is_refused(server, refs):
    with pytest.raises(Exception):
        asyncio.run(realtime(server.ws_url + "/v1/realtime", refs["pcm16"][:8000], headers={"Host": "evil.example"}))


def test_websocket_needs_its_key(keyed, refs):
    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        asyncio.run(realtime(keyed.ws_url + "/v1/realtime", refs["pcm16"][:8000]))
    assert e.value.response.status_code == 401


async def _until_closed(ws) -> list:
    events = []
    try:
        while True:
            events.append(json.loads(await ws.recv()))
    except websockets.exceptions.ConnectionClosed:
        return events


def test_idle_live_session_is_closed(server):
    async def run():
        async with websockets.connect(server.ws_url + "/v1/realtime") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(np.zeros(160, np.int16).tobytes()).decode()}))
            start = time.monotonic()
            events = await asyncio.wait_for(_until_closed(ws), 20)
            return events, time.monotonic() - start, ws.close_code

    events, took, code = asyncio.run(run())
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "idle_timeout"
    assert took < 10 and code == 1008


def test_live_session_length_is_capped(server):
    async def run():
        async with websockets.connect(server.ws_url + "/v1/realtime", max_size=None) as ws:
            await ws.recv()
            chunk = base64.b64encode(np.zeros(8000, np.int16).tobytes()).decode()
            try:
                for _ in range(40):  # 20 s against a 6 s limit
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
                    await asyncio.sleep(0.01)
            except websockets.exceptions.ConnectionClosed:
                pass
            return await asyncio.wait_for(_until_closed(ws), 30), ws.close_code

    events, code = asyncio.run(run())
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "session_too_long"
    assert code == 1008


def test_a_flooding_client_is_slowed_not_buffered(model_fp32, clips):
    """Audio far ahead of the decoder: the server stops reading the socket (backpressure); its
    memory grows by what the backlog limit allows, not by what the client sends."""
    served = Served(make_app(model_fp32, clips, max_live_seconds=None, live_idle_timeout=30.0), **uvicorn_settings())
    before = rss_bytes()

    async def run():
        async with websockets.connect(served.ws_url + "/v1/realtime", max_size=None) as ws:
            await ws.recv()
            chunk = json.dumps({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(np.zeros(16000, np.int16).tobytes()).decode()})
            start = time.monotonic()
            sent = 0
            try:
                while time.monotonic() - start < 3:
                    await asyncio.wait_for(ws.send(chunk), 3)
                    sent += 1
            except (asyncio.TimeoutError, websockets.exceptions.ConnectionClosed):
                pass
            return sent

    try:
        sent = asyncio.run(run())
    finally:
        served.close()
    assert sent < 1000  # into an unbounded buffer a client sends thousands of seconds in 3 s
    assert rss_bytes() - before < 200 * 2**20


def test_live_sessions_cannot_take_every_slot(server, clips, refs):
    """Two live sessions at most (max_live): a third is told to retry; HTTP requests still run."""

    async def run():
        chunk = base64.b64encode(np.zeros(1600, np.int16).tobytes()).decode()
        sockets = []
        for _ in range(2):
            ws = await websockets.connect(server.ws_url + "/v1/realtime")
            await ws.recv()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            sockets.append(ws)
        await asyncio.sleep(0.3)
        third = await websockets.connect(server.ws_url + "/v1/realtime")
        await third.recv()
        await third.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        refused = await asyncio.wait_for(_until_closed(third), 10)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            r = await client.post("/v1/chat/completions", json=chat_body(data_url(clips["speech_1s"])))
        for ws in sockets:
            await ws.close()
        return refused, third.close_code, r

    refused, code, r = asyncio.run(run())
    assert refused[-1]["error"]["type"] == "rate_limit_error" and code == 1013
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == refs["speech_1s"].text


def test_health_counts_only_live_work(server):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = server.http.get("/health").json()
        if health["active"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.1)
    assert health == {"status": "ok", "model": "default", "active": 0, "waiting": 0}


# afterwards ---------------------------------------------------------------------------------
def test_the_server_still_transcribes_exactly(server, clips, refs):
    r = post_chat(server, chat_body(data_url(clips["speech_2s"]), data_url(clips["speech_1s"])))
    assert r.json()["choices"][0]["message"]["content"] == refs["speech_2s"].text + "\n" + refs["speech_1s"].text
    deltas, done, _ = asyncio.run(realtime(server.ws_url + "/v1/realtime", refs["pcm16"]))
    assert done["text"] == refs["live"].text


# load ---------------------------------------------------------------------------------------
def test_mixed_load(model_fp32, clips, refs):
    """64 concurrent requests of every kind, 8 live sessions, 4 idle sessions and 8 slow uploads
    at once: every well-formed request gets its sequential text, the idle sessions are closed by
    their timeout, nothing answers 500."""
    served = Served(make_app(model_fp32, clips, max_concurrency=16, max_queue=128, max_live=12,
                             live_idle_timeout=2.0, max_live_seconds=60.0, body_timeout=30.0))
    speech_1s = Path(clips["speech_1s"]).read_bytes()

    async def chat(client, i):
        kind = i % 4
        if kind == 0:
            r = await client.post("/v1/chat/completions", json=chat_body(data_url(clips["speech_1s"])))
            return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
        if kind == 1:
            r = await client.post("/v1/audio/transcriptions",
                                  files={"file": ("a.wav", speech_1s, "audio/wav")}, data={"response_format": "text"})
            return r.status_code, r.text.strip()
        if kind == 2:
            r = await client.post("/v1/chat/completions", json=_body(temperature=-1))
            return r.status_code, "bad"
        r = await client.post("/v1/chat/completions", json=chat_body(data_url(clips["speech_2s"])))
        return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text

    async def slow_upload(client):
        body = json.dumps(chat_body(data_url(clips["speech_1s"]))).encode()

        async def trickle():
            for i in range(0, len(body), len(body) // 8 + 1):
                yield body[i : i + len(body) // 8 + 1]
                await asyncio.sleep(0.1)

        r = await client.post("/v1/chat/completions", content=trickle(), headers={"content-type": "application/json"})
        return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text

    async def idle():
        async with websockets.connect(served.ws_url + "/v1/realtime") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(np.zeros(160, np.int16).tobytes()).decode()}))
            return await asyncio.wait_for(_until_closed(ws), 30)

    async def run():
        async with httpx.AsyncClient(base_url=served.url, timeout=300,
                                     limits=httpx.Limits(max_connections=200)) as client:
            tasks = [chat(client, i) for i in range(64)] + [slow_upload(client) for _ in range(8)]
            lives = [realtime(served.ws_url + "/v1/realtime", refs["pcm16"]) for _ in range(8)]
            idles = [idle() for _ in range(4)]
            return await asyncio.gather(asyncio.gather(*tasks), asyncio.gather(*lives), asyncio.gather(*idles))

    try:
        answers, lives, idles = asyncio.run(run())
    finally:
        served.close()
    expected = {0: refs["speech_1s"].text, 1: refs["speech_1s"].text, 3: refs["speech_2s"].text}
    for i, (status, text) in enumerate(answers[:64]):
        assert status != 500
        if i % 4 == 2:
            assert status == 400
        else:
            assert status == 200 and text == expected[i % 4], (i, status, text)
    assert all(a == (200, refs["speech_1s"].text) for a in answers[64:])
    assert all(done["text"] == refs["live"].text for _, done, _ in lives)
    assert all(events[-1]["error"]["code"] == "idle_timeout" for events in idles)
