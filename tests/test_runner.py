"""The mistral.rs-compatible Runner: the seed example, audio sources, streaming, errors."""

from __future__ import annotations

import base64
import functools
import http.server
import threading
from pathlib import Path

import pytest

import mlx_voxtral
from conftest import make_checkpoint
from mlx_voxtral import ChatCompletionRequest, InvalidRequestError, Runner, VisionArchitecture, Which


@pytest.fixture(scope="module")
def decisive_checkpoint(tmp_path_factory) -> Path:
    """Logits scaled up so that sampling at temperature 0.1 picks the argmax, as a trained
    model's confident predictions do (the seed example samples at 0.1)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "decisive", "--logit-scale", "100000")


@pytest.fixture(scope="module")
def runner(tiny_checkpoint) -> Runner:
    return Runner(which=Which.VisionPlain(model_id=str(tiny_checkpoint), arch=VisionArchitecture.Voxtral))


def request(*parts, **options) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="default", messages=[{"role": "user", "content": list(parts)}], **options)


def audio_url(url: str) -> dict:
    return {"type": "audio_url", "audio_url": {"url": url}}


def content(runner: Runner, *parts, **options) -> str:
    return runner.send_chat_completion_request(request(*parts, **options)).choices[0].message.content


def test_seed_example(decisive_checkpoint, speech_5s):
    """mistral.rs's Python example for this model, only the import line changed."""
    from mlx_voxtral import Runner, Which, ChatCompletionRequest, VisionArchitecture  # noqa: F811

    runner = Runner(
        which=Which.VisionPlain(
            model_id=str(decisive_checkpoint),
            arch=VisionArchitecture.Voxtral,
        ),
    )

    res = runner.send_chat_completion_request(
        ChatCompletionRequest(
            model="ignore",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "audio_url",
                            "audio_url": {
                                "url": str(speech_5s)
                            },
                        },
                        {
                            "type": "text",
                            "text": "Transcribe this audio.",
                        },
                    ],
                }
            ],
            max_tokens=256,
            temperature=0.1,
        )
    )
    print(res.choices[0].message.content)
    print(res.usage)

    expected = mlx_voxtral.transcribe(runner.model, speech_5s, temperature=0.0)
    assert expected.text
    assert res.choices[0].message.content == expected.text
    assert res.choices[0].finish_reason == "stop"
    assert res.object == "chat.completion" and res.model == "ignore"
    assert res.id.startswith("chatcmpl-") and res.created > 0
    u = res.usage
    assert u.prompt_tokens == expected.prompt_tokens
    assert u.completion_tokens == len(expected.token_ids)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.total_time_sec > 0 and u.avg_compl_tok_per_sec > 0 and u.avg_prompt_tok_per_sec > 0
    for name in ("avg_tok_per_sec", "total_prompt_time_sec", "total_completion_time_sec"):
        assert getattr(u, name) > 0


def test_audio_sources_agree(runner, speech_5s, tmp_path):
    expected = mlx_voxtral.transcribe(runner.model, speech_5s).text
    data = speech_5s.read_bytes()
    b64 = base64.b64encode(data).decode()
    assert content(runner, audio_url(str(speech_5s))) == expected
    assert content(runner, audio_url(speech_5s.as_uri())) == expected
    assert content(runner, audio_url(f"data:audio/wav;base64,{b64}")) == expected
    assert content(runner, {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}) == expected
    assert content(runner, {"type": "audio_url", "audio_url": str(speech_5s)}) == expected  # bare string


@pytest.fixture
def http_root(tmp_path, speech_5s):
    (tmp_path / "speech.wav").write_bytes(speech_5s.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_url(runner, speech_5s, http_root):
    expected = mlx_voxtral.transcribe(runner.model, speech_5s).text
    assert content(runner, audio_url(f"{http_root}/speech.wav")) == expected
    with pytest.raises(InvalidRequestError, match="HTTP 404"):
        content(runner, audio_url(f"{http_root}/missing.wav"))


def test_several_parts_in_order(runner, speech_5s, silence_2s):
    a = mlx_voxtral.transcribe(runner.model, speech_5s).text
    b = mlx_voxtral.transcribe(runner.model, silence_2s).text
    got = content(runner, audio_url(str(speech_5s)), {"type": "text", "text": "ignored"}, audio_url(str(silence_2s)))
    assert got == f"{a}\n{b}"


def test_stream_matches_non_stream(runner, speech_5s, silence_2s):
    parts = (audio_url(str(speech_5s)), audio_url(str(silence_2s)))
    whole = runner.send_chat_completion_request(request(*parts))
    chunks = list(runner.send_chat_completion_request(request(*parts, stream=True)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert len(chunks) > 3  # text arrives in pieces
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_finish_reason(runner, speech_5s):
    full = mlx_voxtral.transcribe(runner.model, speech_5s)
    assert full.text_tokens > 10
    res = runner.send_chat_completion_request(request(audio_url(str(speech_5s)), max_tokens=5))
    assert res.choices[0].finish_reason == "length"
    cut = res.choices[0].message.content
    assert cut and full.text.startswith(cut) and len(cut) < len(full.text)
    # the budget spans all parts: the second part is never started
    res = runner.send_chat_completion_request(request(audio_url(str(speech_5s)), audio_url(str(speech_5s)), max_tokens=5))
    assert res.choices[0].message.content == cut and res.choices[0].finish_reason == "length"
    stream = list(runner.send_chat_completion_request(request(audio_url(str(speech_5s)), max_tokens=5, stream=True)))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == cut
    assert stream[-1].choices[0].finish_reason == "length"


def test_in_situ_quant(tiny_checkpoint, speech_5s):
    import mlx.nn as nn

    for name, bits in (("Q4K", 4), ("Q8_0", 8), ("AFQ3", 3), ("4", 4)):
        runner = Runner(which=Which.MultimodalPlain(model_id=str(tiny_checkpoint),
                                                    arch=mlx_voxtral.MultimodalArchitecture.Voxtral),
                        in_situ_quant=name)
        q = runner.model.decoder.layers[0].attention.wq
        assert isinstance(q, nn.QuantizedLinear) and q.bits == bits
    assert content(runner, audio_url(str(speech_5s)))
    runner = Runner(which=Which.VisionPlain(model_id=str(tiny_checkpoint)), in_situ_quant="Q4K",
                    quantize_mode="nvfp4", backend="mlx")
    q = runner.model.decoder.layers[0].attention.wq
    assert (q.mode, q.bits, q.group_size) == ("nvfp4", 4, 16)
    with pytest.raises(InvalidRequestError, match="bits must be 4 in mode mxfp4, got 8"):
        Runner(which=Which.VisionPlain(model_id=str(tiny_checkpoint)), in_situ_quant="Q8_0", quantize_mode="mxfp4")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "user", "content": "just text"}], "no audio"),
        ([{"role": "wizard", "content": "x"}], "role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "unsupported content part"),
        ([{"role": "user", "content": [{"audio_url": {"url": "x"}}]}], "no 'type'"),
        ([{"role": "user", "content": [{"type": "audio_url", "audio_url": {}}]}], "audio_url"),
        ([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "/no/such.wav"}}]}], "not found"),
        ([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,@@@"}}]}], "base64"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "wav"}}]}], "input_audio"),
        ([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "ftp://host/a.wav"}}]}], "scheme"),
        ([{"role": "user", "content": 42}], "string or a list"),
    ],
)
def test_bad_messages(runner, messages, match):
    with pytest.raises(InvalidRequestError, match=match):
        runner.send_chat_completion_request(ChatCompletionRequest(model="x", messages=messages))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"n_choices": 2}, "one choice"),
        ({"delay_ms": 100}, "delay"),
    ],
)
def test_bad_options(runner, speech_5s, options, match):
    with pytest.raises(InvalidRequestError, match=match):
        runner.send_chat_completion_request(request(audio_url(str(speech_5s)), **options))
    with pytest.raises(InvalidRequestError, match=match):  # no half-started stream either
        runner.send_chat_completion_request(request(audio_url(str(speech_5s)), stream=True, **options))


def test_corrupt_audio_is_typed(runner, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(mlx_voxtral.AudioError):
        content(runner, audio_url(str(bad)))


def test_bad_runner_arguments(tiny_checkpoint):
    with pytest.raises(InvalidRequestError, match="in_situ_quant"):
        Runner(which=Which.VisionPlain(model_id=str(tiny_checkpoint)), in_situ_quant="Q2K")
    with pytest.raises(InvalidRequestError, match="which"):
        Runner(which=str(tiny_checkpoint))
    with pytest.raises(mlx_voxtral.CheckpointError):
        Runner(which=Which.VisionPlain(model_id="/no/such/folder"))


def test_local_files_can_be_forbidden(tiny_checkpoint, speech_5s):
    runner = Runner(which=Which.VisionPlain(model_id=str(tiny_checkpoint)), allow_local_files=False)
    with pytest.raises(InvalidRequestError, match="local files are not allowed"):
        content(runner, audio_url(str(speech_5s)))
