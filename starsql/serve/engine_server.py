"""The model in a process of its own, behind an OpenAI-compatible completions endpoint: what `WORKERS` puts
behind several app processes (starsql.serve.workers), each a thin front end through `INFERENCE_URL`.

    python -m starsql.serve.engine_server --base_model bigcode/starcoder2-3b --adapter USER/starcoder2-3b-sql --port 8000

It serves the backend the app would build in its own process (starsql.serve.decode.build_backend: on a dedicated
GPU the batched decoder, which decodes the answers of every front end together), as much of the OpenAI API as
starsql.serve.remote.RemoteBackend and other plain clients use:
- POST /v1/completions: `prompt`, `max_tokens`, `temperature` (0: greedy), `stream`; the text ends with the
  answer's first statement, as the app's own backends end it.
- GET /v1/models; GET /health (200 once the model is loaded, with the answers it decodes at once); GET /usage
  (the app's /usage figures).
At most the backend's concurrency answers run at once; the rest wait here, in arrival order.
"""

import argparse
import asyncio
import json
import os
import threading
import time
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .decode import (BackendError, RecentWaits, build_backend, env_count, fast_backend_wanted, freeze_long_lived_objects,
                     usage_report)
from .load import load_for_inference

MAX_TOKENS = 512  # the most one request may ask for (the app's own limit)
KEEP_ALIVE_S = 10.0  # a waiting stream's comment interval: well inside a client's read timeout (the app's: 60 s)
# After a stream's first piece (sent at once), the next goes this long after the one before, with every token that came
# meanwhile (env STREAM_INTERVAL_MS; 0: a chunk as each piece comes): a chunk a token costs Python time on both sides
# (JSON, SSE, the client's parsing), here in the process whose engine thread must launch every step. The app shows
# an update every CHAT_UPDATE_S, longer.
STREAM_INTERVAL_MS = 20


def completion_request(body) -> tuple[str, int, float, bool]:
    """(prompt, max_tokens, temperature, stream) from a request body; ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("The body must be a JSON object.")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("`prompt` must be a non-empty string (one prompt per request).")
    max_tokens, temperature = body.get("max_tokens", 16), body.get("temperature", 1.0)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS:
        raise ValueError(f"`max_tokens` must be a whole number from 1 to {MAX_TOKENS}; got {max_tokens!r}.")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise ValueError(f"`temperature` must be a number from 0 to 2; got {temperature!r}.")
    return prompt, max_tokens, float(temperature), bool(body.get("stream", False))


def _completion(request_id: str, model: str, text: str, finish_reason: str | None) -> dict:
    """An OpenAI text completion: the whole answer, or one piece of a streamed one."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice]}  # fmt: skip


def _chunk(request_id: str, model: str, text: str, finish_reason: str | None) -> str:
    return f"data: {json.dumps(_completion(request_id, model, text, finish_reason))}\n\n"


def build_app(backend, model_name: str, keep_alive_s: float = KEEP_ALIVE_S,
              stream_interval_s: float = STREAM_INTERVAL_MS / 1e3) -> Starlette:
    """The endpoint over `backend` (anything with stream() and concurrency, as starsql.serve.decode describes).
    A streamed request that waits (for a free slot, or for its first token while the model warms up) gets an SSE
    comment every `keep_alive_s`, so that its client does not take the silence for a dead endpoint. A stream's
    pieces after its first go at most one every `stream_interval_s`, each with the text that came meanwhile."""
    slots = asyncio.Semaphore(backend.concurrency)
    first_pieces = RecentWaits()  # each request's time from its arrival here to its first piece of text

    async def pieces(prompt: str, max_tokens: int, temperature: float, arrived: float):
        """The answer's new text, piece by piece, and "" after each `keep_alive_s` without any. The backend runs
        in a thread of its own; pieces that pile up (during `stream_interval_s` after a piece, or while the event
        loop is busy) are sent as one. Leaving early (the client went) ends the generation."""
        # Waits go through asyncio.wait, which never cancels what it waits for on a timeout (wait_for may, and
        # on some Pythons lose a slot or a queue item that arrived at that moment).
        acquiring = asyncio.ensure_future(slots.acquire())
        try:
            while not (await asyncio.wait({acquiring}, timeout=keep_alive_s))[0]:
                yield ""
        except BaseException:  # the client left while waiting: a slot taken meanwhile goes back
            if not acquiring.cancel() and not acquiring.cancelled() and acquiring.exception() is None:
                slots.release()
            raise
        loop, queue, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def pump():
            stream = backend.stream(prompt, max_tokens, temperature)
            try:
                for text in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, text)
                    if gone.is_set():
                        break
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as error:  # noqa: BLE001 -- handed to the reader, which reports it
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                stream.close()

        getting = None
        try:
            threading.Thread(target=pump, daemon=True, name="engine-request").start()
            sent, newest, send_at = "", "", 0.0  # newest: the text so far; send_at: when it may go (loop time)
            while True:
                getting = getting or asyncio.ensure_future(queue.get())
                wait = keep_alive_s if newest == sent else max(0.0, send_at - loop.time())
                if not (await asyncio.wait({getting}, timeout=wait))[0]:
                    if newest == sent:
                        yield ""  # nothing new for keep_alive_s
                    else:  # its interval is over: what came meanwhile goes as one
                        yield newest[len(sent):]
                        sent, send_at = newest, loop.time() + stream_interval_s
                    continue
                items, getting = [getting.result()], None
                while not queue.empty():
                    items.append(queue.get_nowait())
                texts = [item for item in items if isinstance(item, str)]
                if texts and len(texts[-1]) > len(newest):  # each piece is the whole text so far
                    newest = texts[-1]
                ended = items[-1] is None or isinstance(items[-1], Exception)  # always the last thing put
                if newest != sent and (ended or loop.time() >= send_at):  # the end goes at once, with the rest
                    if not sent:
                        first_pieces.add(time.perf_counter() - arrived)
                    yield newest[len(sent):]
                    sent, send_at = newest, loop.time() + stream_interval_s
                if items[-1] is None:
                    return
                if isinstance(items[-1], Exception):
                    raise items[-1]
        finally:
            if getting is not None:
                getting.cancel()
            gone.set()
            slots.release()

    async def completions(request: Request):
        arrived = time.perf_counter()
        try:
            prompt, max_tokens, temperature, stream = completion_request(await request.json())
        except json.JSONDecodeError:
            return _error(400, "The body is not JSON.")
        except ValueError as error:
            return _error(400, str(error))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        if not stream:
            text = ""
            try:
                async for piece in pieces(prompt, max_tokens, temperature, arrived):
                    text += piece
            except Exception as error:  # noqa: BLE001 -- the client gets what failed, not a dropped connection
                return _error(500, _failure(error), "server_error")
            return JSONResponse(_completion(request_id, model_name, text, "stop"))

        async def events():
            try:
                async for piece in pieces(prompt, max_tokens, temperature, arrived):
                    yield _chunk(request_id, model_name, piece, None) if piece else ": waiting\n\n"
            except Exception as error:  # noqa: BLE001 -- the stream has begun: the error travels in it, as OpenAI's does
                yield f"data: {json.dumps({'error': {'message': _failure(error), 'type': 'server_error'}})}\n\n"
                return
            yield _chunk(request_id, model_name, "", "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(_):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "starsql"}]})

    async def health(_):
        return JSONResponse({"status": "ok", "concurrency": backend.concurrency})

    async def usage(_):
        return JSONResponse({**usage_report(backend), "first_piece": first_pieces.snapshot()})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/v1/models", models),
                             Route("/health", health), Route("/usage", usage)])  # fmt: skip


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _failure(error: Exception) -> str:
    """What a failed answer tells the client: the backend's own message, or the error's kind and text."""
    return str(error) if isinstance(error, BackendError) else f"The model failed: {type(error).__name__}: {error}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The StarSQL model behind an OpenAI-compatible completions endpoint.")
    parser.add_argument("--base_model", default=os.environ.get("BASE_MODEL") or "bigcode/starcoder2-3b")
    parser.add_argument("--adapter", default=os.environ.get("ADAPTER", ""))
    parser.add_argument("--load_in_4bit", action="store_true")
    parser.add_argument("--model_name", default="", help="The name clients ask for (default: --adapter, else --base_model).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--stream_interval_ms", type=int, default=None,
                        help="Milliseconds between two streamed chunks of an answer after its first, which goes at once "
                             f"(env STREAM_INTERVAL_MS; default {STREAM_INTERVAL_MS}; 0: a chunk for every piece the model writes).")
    args = parser.parse_args(argv)
    interval = args.stream_interval_ms
    if interval is None:
        try:
            interval = env_count("STREAM_INTERVAL_MS", 0, "milliseconds", "a chunk for every piece")
        except ValueError as error:
            parser.error(str(error))
        interval = STREAM_INTERVAL_MS if interval is None else interval
    if interval < 0:
        parser.error(f"--stream_interval_ms must be 0 or more, not {interval}")
    model, tokenizer = load_for_inference(args.base_model, args.adapter or None, args.load_in_4bit)
    backend = build_backend(model, tokenizer, fast=fast_backend_wanted(args.load_in_4bit))
    app = build_app(backend, args.model_name or args.adapter or args.base_model, stream_interval_s=interval / 1e3)
    freeze_long_lived_objects()  # the model, torch; the fast backend's builds freeze again once they end
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
