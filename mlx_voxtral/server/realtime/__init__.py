"""Live transcription over websockets, in the dialects real clients speak.

* ``vllm``: vLLM's Voxtral realtime protocol (``/v1/realtime``), 16 kHz PCM16.
* ``openai``: OpenAI's Realtime API transcription sessions, GA (``session.update`` with
  ``type: "transcription"``) and beta (``transcription_session.update``), on ``/v1/realtime``.
* ``mistral``: Mistral's realtime transcription API (``/v1/audio/transcriptions/realtime``).

All of them run on ``core.LiveSession``: one engine, one way of turning audio into text.
``/v1/realtime`` serves both vLLM and OpenAI clients: the first session event (or
``?intent=transcription`` in the URL) says which dialect a connection speaks.
"""
