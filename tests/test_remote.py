"""The OpenAI-compatible endpoint backend against a real server (`transformers serve` with the tiny model on
127.0.0.1), and the messages a user gets when an endpoint is down, slow or refuses."""

import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from starsql.prompt import build_prompt
from starsql.serve.decode import BackendError, stream_sql
from starsql.serve.load import load_for_inference
from starsql.serve.remote import RemoteBackend
from servers import free_port

PROMPT = build_prompt("CREATE TABLE singer (name VARCHAR, age INTEGER)", "Names of singers older than 30?")


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """The app's model (tiny base + trained adapter, merged) saved and served by `transformers serve`."""
    if shutil.which("transformers") is None:
        pytest.skip("the `transformers` command is not installed")
    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    folder = tmp_path_factory.mktemp("served-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = free_port()
    server = subprocess.Popen(["transformers", "serve", "--host", "127.0.0.1", "--port", str(port), str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import httpx

        for _ in range(120):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                pytest.fail(f"transformers serve exited: {server.stderr.read()[-2000:]}")
            time.sleep(0.5)
        else:
            pytest.fail("transformers serve did not start in 60 s")
        yield f"http://127.0.0.1:{port}", str(folder), model, tokenizer
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_endpoint_streams_what_local_generate_streams(served):
    url, name, model, tokenizer = served
    backend = RemoteBackend(url, model=name)
    pieces = list(backend.stream(PROMPT, 24))
    *_, local = stream_sql(model, tokenizer, PROMPT, max_new_tokens=24)
    assert len(pieces) > 1 and all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))  # streamed, growing
    assert pieces[-1] == local  # greedy: the same model gives the same answer over HTTP
    assert list(backend.stream(PROMPT, 0)) == []


def test_an_endpoint_url_with_v1_works_too(served):
    url, name, _, _ = served
    assert list(RemoteBackend(url + "/v1/", model=name).stream(PROMPT, 4))


def test_an_endpoint_that_is_down_says_so():
    backend = RemoteBackend(f"http://127.0.0.1:{free_port()}", model="sql")  # nothing listens there
    with pytest.raises(BackendError, match="Cannot reach the inference endpoint"):
        list(backend.stream(PROMPT, 8))


class _Server:
    """A local HTTP server whose handler is given; stops when the test ends."""

    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_endpoint_that_refuses_says_what_to_check():
    class Refuses(BaseHTTPRequestHandler):
        def do_POST(self):
            body = b'{"error": {"message": "Invalid API key", "type": "invalid_request_error"}}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = _Server(Refuses)
    try:
        backend = RemoteBackend(server.url, model="sql", api_key="secret-key-123")
        with pytest.raises(BackendError, match=r"refused the request \(HTTP 401: .*Invalid API key") as caught:
            list(backend.stream(PROMPT, 8))
        assert "INFERENCE_API_KEY" in str(caught.value) and "secret-key-123" not in str(caught.value)
    finally:
        server.close()


def test_an_endpoint_that_hangs_times_out_with_a_message():
    release = threading.Event()

    class Hangs(BaseHTTPRequestHandler):
        def do_POST(self):
            release.wait(10)  # never answers within the client's timeout

        def log_message(self, *args):
            pass

    server = _Server(Hangs)
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match="did not answer in time"):
            list(RemoteBackend(server.url, model="sql", timeout=1.0).stream(PROMPT, 8))
        assert time.monotonic() - started < 5
    finally:
        release.set()
        server.close()


def test_the_app_answers_through_the_endpoint_and_says_when_it_is_down(served, tiny_run, tmp_path):
    # INFERENCE_URL makes app.py a thin front end: its prompt, checks and API, the endpoint's model.
    from gradio_client import Client

    from test_app import running_app

    url, name, model, tokenizer = served
    schema = "CREATE TABLE singer (name VARCHAR, age INTEGER);"
    question = "Names of singers older than 30?"
    expected = list(RemoteBackend(url, model=name).stream(build_prompt(schema, question), 256))[-1]
    with running_app(tiny_run, tmp_path / "app.log", INFERENCE_URL=url, INFERENCE_MODEL=name) as app_url:
        result = Client(app_url, verbose=False).predict(question, schema, api_name="/sql")
    assert result["sql"] and result["sql"].split()[0] == expected.split()[0]  # the endpoint's answer, checked
    with running_app(tiny_run, tmp_path / "down.log", INFERENCE_URL=f"http://127.0.0.1:{free_port()}",
                     INFERENCE_API_KEY="secret-key-123") as app_url:
        result = Client(app_url, verbose=False).predict(question, schema, api_name="/sql")
    assert "Cannot reach the inference endpoint" in result["error"] and not result["valid"]
    assert "secret-key-123" not in (tmp_path / "down.log").read_text()


def test_bad_settings_are_refused_up_front():
    with pytest.raises(ValueError, match="http"):
        RemoteBackend("127.0.0.1:8000", model="sql")
    with pytest.raises(ValueError, match="at least 1"):
        RemoteBackend("http://127.0.0.1:8000", model="sql", concurrency=0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
