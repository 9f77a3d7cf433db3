"""Where a streamed /chat update waits on its way to a gradio_client caller: the server's event stream, the
client's reader thread, or the job's iterator. Against a running app:

    python3 bench/gradio_client_probe.py http://127.0.0.1:7860/

Prints, in seconds from sending each request:
- raw: POST /queue/join, then the session's event stream (/queue/data) read directly with httpx, line by line
  and byte by byte: when the server sent each message;
- gc: the same request through gradio_client, read with `for update in job`: when the caller got each update,
  and when gradio_client's reader thread received the stream's bytes.
An update the reader received long before the caller got it waited in gradio_client itself.
"""

import platform
import sys
import time
import uuid

import httpx
from serve_load import QUESTIONS, SCHEMA


def raw(url: str, fn_index: int, mode: str) -> list[tuple[float, str]]:
    """One request over the queue's own protocol: (seconds, message kind) of each data line of its stream."""
    data = [QUESTIONS[0], SCHEMA, [], 64, 0.0, "sqlite", None]
    session, sent, seen = uuid.uuid4().hex, time.perf_counter(), []
    with httpx.Client(timeout=60) as http:
        http.post(f"{url}gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                       "event_data": None, "trigger_id": None}).raise_for_status()  # fmt: skip
        with http.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}) as stream:
            for chunk in stream.iter_lines() if mode == "lines" else stream.iter_bytes():
                text = chunk if isinstance(chunk, str) else chunk.decode()
                for kind in ("estimation", "process_starts", "process_generating", "process_completed"):
                    seen += [(round(time.perf_counter() - sent, 3), kind)] * text.count(f'"msg":"{kind}"')
                if "process_completed" in text or "close_stream" in text:
                    return seen
    return seen


def main() -> int:
    url = sys.argv[1]
    from gradio_client import Client

    print("python", platform.python_version(), "httpx", httpx.__version__)
    client = Client(url, verbose=False)
    fn_index = next(i for i, endpoint in client.endpoints.items() if getattr(endpoint, "api_name", None) == "/chat")
    for mode in ("lines", "bytes"):
        for number in range(3):
            print("raw", mode, number, raw(url, fn_index, mode))
    received: list[float] = []
    iter_bytes = httpx.Response.iter_bytes

    def timed_iter_bytes(self, *args, **kwargs):  # gradio_client's reader thread reads the stream with it
        for chunk in iter_bytes(self, *args, **kwargs):
            received.append(time.perf_counter())
            yield chunk

    httpx.Response.iter_bytes = timed_iter_bytes
    for number in range(4):
        received.clear()
        sent = time.perf_counter()
        job = client.submit(message=QUESTIONS[0], schema=SCHEMA, history=[], max_new_tokens=64, temperature=0.0,
                            api_name="/chat")  # fmt: skip
        updates = [round(time.perf_counter() - sent, 3) for _ in job]
        print("gc", number, "updates", updates, "chunks at", [round(at - sent, 3) for at in received])
    return 0


if __name__ == "__main__":
    sys.exit(main())
