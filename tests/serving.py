"""Helpers for the server tests: a real uvicorn on loopback, request bodies, a realtime client."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def write_wav(path: Path, audio: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> Path:
    sf.write(str(path), audio, rate, subtype=subtype)
    return path


def b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def data_url(path: Path) -> str:
    return f"data:audio/wav;base64,{b64(path)}"


def chat_body(*urls: str, **options) -> dict:
    parts = [{"type": "audio_url", "audio_url": {"url": u}} for u in urls]
    return {"model": "default", "messages": [{"role": "user", "content": parts}], **options}


def free_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class Served:
    """An app on a loopback port, served by uvicorn in a background thread (``config``:
    more ``uvicorn.Config`` arguments, e.g. the server's own limits)."""

    def __init__(self, app, port: int = 0, **config):
        import httpx
        import uvicorn

        try:
            sock = free_socket(port)
        except OSError:  # the preferred port is taken
            sock = free_socket(0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = self.url.replace("http", "ws")
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def realtime(url: str, pcm16: np.ndarray, headers=None, chunk: int = 1600,
                   words: list | None = None) -> tuple[list, dict, dict]:
    """A vLLM-dialect live session: the deltas, the final event and ``session.created``;
    ``words``: a list the ``transcription.word`` events are appended to."""
    import websockets

    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        created = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "session.update", "model": "default"}))
        for i in range(0, len(pcm16), chunk):  # 100 ms of PCM16 per event
            audio = base64.b64encode(pcm16[i : i + chunk].astype("<i2").tobytes()).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        deltas = []
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "transcription.delta":
                deltas.append(event["delta"])
            elif event["type"] == "transcription.word":
                if words is not None:
                    words.append(event)
            else:
                return deltas, event, created


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")
