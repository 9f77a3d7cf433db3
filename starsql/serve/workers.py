"""Several app processes in front of one model process: `WORKERS=6 python app.py`.

One Python process caps the answers a second the app can serve, whatever the GPU does: Gradio's queue and event
streams take most of an answer's CPU time, all under one interpreter lock. With WORKERS=N, `python app.py` starts
instead:
- the model's process (starsql.serve.engine_server, an OpenAI-compatible endpoint on a free local port), whose
  batched decoder decodes every front end's answers together;
- N app processes, each `python app.py` with INFERENCE_URL set to it: the prompt, the checks and the UI;
- a router on the app's own address (GRADIO_SERVER_NAME, GRADIO_SERVER_PORT) that sends each user to one app
  process, always the same: by a cookie it sets on the first response (browsers and gradio_client send it back
  with every request), else by the Gradio session of the request (its session_hash), else, for a plain
  `/call/<api>` request, by the event id the first half of that call was given; the rest take turns.
Every app process saves uploads into one shared folder (GRADIO_TEMP_DIR), so a file sent to one is found by all.
"""

import contextlib
import ctypes
import http.cookiejar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from collections import OrderedDict
from itertools import count

COOKIE = "starsql_worker"
START_TIMEOUT_S = 1800  # the model's process loads the weights (minutes from the Hub) before it answers
CALL_EVENTS = 10_000  # plain /call event ids remembered (the second half of a call follows the first at once)
JSON_BODY_BYTES = 64 << 20  # non-multipart request bodies read to find their session; others stream through
_SESSION_IN_PATH = re.compile(r"/heartbeat/([^/?]+)")
_CALL_EVENT = re.compile(r"/call/[^/]+/([^/?]+)$")
# Connection-level headers belong to one hop, not to the request or answer passed on (the router's server sets
# its own date, server and length headers).
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
                "content-length"}  # fmt: skip
_OWN_HEADERS = {"date", "server"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_app(upstreams: list[str]):
    """The router: an ASGI app that passes every request on to one of `upstreams` (app processes' base URLs)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    # No cookie jar: a cookie one app process sets belongs to one user, not to every later request.
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=httpx.Limits(max_connections=None),
                               cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])))
    turns, events = count(), OrderedDict()
    relaying = set()  # the app processes' answers being passed on (an event stream stays open as long as its page)

    def pick(request: Request, body: bytes | None) -> tuple[int, bool]:
        """(the app process for this request, whether the request came with a valid cookie)."""
        cookie = request.cookies.get(COOKIE, "")
        if cookie.isdigit() and int(cookie) < len(upstreams):
            return int(cookie), True
        # An upload and its progress stream share an upload_id (the progress is kept in the process that took it).
        session = request.query_params.get("session_hash") or request.query_params.get("upload_id")
        if session is None and (match := _SESSION_IN_PATH.search(request.url.path)):
            session = match.group(1)
        if session is None and body:
            try:
                session = json.loads(body).get("session_hash")
            except (ValueError, AttributeError):
                session = None
        if isinstance(session, str) and session:
            return zlib.crc32(session.encode()) % len(upstreams), False
        if (match := _CALL_EVENT.search(request.url.path)) and match.group(1) in events:
            return events[match.group(1)], False
        return next(turns) % len(upstreams), False

    async def forward(request: Request):
        body = None
        if request.method in ("POST", "PUT", "PATCH") and "multipart" not in request.headers.get("content-type", ""):
            if int(request.headers.get("content-length") or 0) <= JSON_BODY_BYTES:
                body = await request.body()
        worker, had_cookie = pick(request, body)
        headers = [(k, v) for k, v in request.headers.raw if k.decode().lower() not in _HOP_HEADERS | {"x-forwarded-for"}]
        if request.client is not None:  # the user's address, for the app process (gr.Request.client)
            forwarded = ", ".join(filter(None, [request.headers.get("x-forwarded-for"), request.client.host]))
            headers.append((b"x-forwarded-for", forwarded.encode("latin-1")))
        url = httpx.URL(upstreams[worker] + request.url.path, query=request.url.query.encode())
        upstream = client.build_request(request.method, url, headers=headers,
                                        content=body if body is not None else request.stream())  # fmt: skip
        try:
            response = await client.send(upstream, stream=True)
        except httpx.HTTPError as error:
            return PlainTextResponse(f"The app's process {worker} does not answer ({type(error).__name__}); try "
                                     "again in a moment.", status_code=502)  # fmt: skip
        if request.method == "POST" and "/call/" in request.url.path and response.status_code == 200:
            raw = await response.aread()  # {"event_id": ...}: its second half (GET .../<event_id>) comes here too
            await response.aclose()
            try:
                events[json.loads(raw)["event_id"]] = worker
                while len(events) > CALL_EVENTS:
                    events.popitem(last=False)
            except (ValueError, KeyError, TypeError):
                pass
            content = iter([raw])
        else:
            content = _relay(response, relaying)
        answer = StreamingResponse(content, status_code=response.status_code)
        for key, value in response.headers.multi_items():
            if key.lower() not in _HOP_HEADERS | _OWN_HEADERS:
                answer.raw_headers.append((key.encode("latin-1"), value.encode("latin-1")))
        if not had_cookie:  # behind https (a Space, embedded in its page) the cookie must cross sites
            secure = request.headers.get("x-forwarded-proto", request.url.scheme) == "https"
            answer.set_cookie(COOKIE, str(worker), httponly=True, secure=secure, samesite="none" if secure else "lax")
        return answer

    async def end_streams():
        """Stopping: end every answer still being passed on, so that each ends as a finished stream does, rather
        than being cut when the server's grace period runs out (an error and a traceback in the log)."""
        for response in list(relaying):
            await response.aclose()

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    app = Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)
    app.state.relaying, app.state.end_streams = relaying, end_streams
    return app


def router_server(router, **config):
    """uvicorn's server for `router` (router_app) with uvicorn.Config's `config`, which ends the streams the router
    passes on as it begins to stop: open event streams would otherwise hold its graceful shutdown until they are cut."""
    import uvicorn

    class RouterServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await router.state.end_streams()
            await super().shutdown(sockets=sockets)

    return RouterServer(uvicorn.Config(router, **config))


async def _relay(response, relaying: set):
    """The app process's answer as it comes, listed in `relaying` meanwhile. An app process that cuts its stream
    short (Gradio does, after an error event) ends ours there, cleanly, rather than as a broken connection; so
    does the router closing it as it stops. Closed however it ends: finished, cut, or its user gone."""
    import httpx

    relaying.add(response)
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except (httpx.HTTPError, httpx.StreamError):  # StreamError: closed by the router, stopping (end_streams)
        return
    finally:
        relaying.discard(response)
        await response.aclose()


def _wait_until_answers(url: str, process: subprocess.Popen, what: str, timeout: float) -> bytes:
    """The body of `url` once `process` answers it; SystemExit if it ends first or takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with code {process.returncode} before it answered; its log is above.")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not answer within {timeout:.0f} s; its log is above.") from None
            time.sleep(0.5)


def serve_workers(app_path: str, workers: int, engine_args: list[str], worker_env: dict[str, str], host: str,
                  port: int, inference_url: str = "") -> None:  # fmt: skip
    """Start the model's process (starsql.serve.engine_server with `engine_args`; none if `inference_url` names
    an endpoint already running), `workers` app processes (app_path, with `worker_env` added to this process's
    environment), and the router on host:port; run until stopped (Ctrl-C or SIGTERM), then stop them all."""
    try:
        import openai  # noqa: F401 -- the app processes reach the model's process through it (starsql.serve.remote)
    except ImportError:
        raise SystemExit("WORKERS above 1 needs the `openai` package: pip install -r requirements.txt") from None
    from . import engine_server  # imported here so that a Space's files include it (starsql.serve.deploy)

    root = os.path.dirname(os.path.abspath(app_path))
    children: list[subprocess.Popen] = []
    ended: list[str] = []  # a child that ended by itself, while serving

    def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
        # A session of its own: Ctrl-C in a terminal reaches the launcher alone, which stops the children in order.
        children.append(subprocess.Popen(command, cwd=root, env=env, preexec_fn=_die_with_launcher, start_new_session=True))
        return children[-1]

    def watch(names: dict[subprocess.Popen, str]) -> None:
        """A child that ends while the router serves ends the whole app (exit code 1), so that whatever
        restarts it (a Space, a container) does: a router without its model answers nobody."""
        while not ended:
            for child, name in names.items():
                if child.poll() is not None:
                    ended.append(f"{name} ended with code {child.returncode}; stopping.")
                    print(f"StarSQL: {ended[-1]}", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            time.sleep(1.0)

    def stopped(*_):
        raise SystemExit(1 if ended else 0)

    signal.signal(signal.SIGTERM, stopped)  # until uvicorn runs, which handles SIGTERM itself and then returns
    try:
        concurrency = os.environ.get("INFERENCE_CONCURRENCY", "")
        names = {}
        if not inference_url:
            engine_port = free_port()
            engine = start([sys.executable, "-m", engine_server.__name__, "--model_name", "starsql",
                            "--port", str(engine_port), *engine_args])  # fmt: skip
            names[engine] = "The model's process"
            print(f"StarSQL: the model's process is loading (port {engine_port}).", flush=True)
            inference_url = f"http://127.0.0.1:{engine_port}"
            health = json.loads(_wait_until_answers(f"{inference_url}/health", engine, names[engine], START_TIMEOUT_S))
            # each app process lets as many answers through as the model's process decodes together; it queues the rest
            concurrency = concurrency or str(health["concurrency"])
            worker_env = {**worker_env, "INFERENCE_MODEL": "starsql"}
        shared = os.environ.get("GRADIO_TEMP_DIR") or tempfile.mkdtemp(prefix="starsql-uploads-")
        ports = [free_port() for _ in range(workers)]
        for number, worker_port in enumerate(ports):
            env = {**os.environ, **worker_env, "WORKERS": "1", "INFERENCE_URL": inference_url,
                   "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(worker_port), "GRADIO_TEMP_DIR": shared}
            if concurrency:
                env["INFERENCE_CONCURRENCY"] = concurrency
            names[start([sys.executable, app_path], env)] = f"App process {number}"
        for worker_port, (child, name) in zip(ports, list(names.items())[-workers:]):
            _wait_until_answers(f"http://127.0.0.1:{worker_port}/", child, name, START_TIMEOUT_S)
        # Listening before it says so: a client that reads the line and connects at once is let in.
        listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
        listening.listen(2048)
        print(f"StarSQL: {workers} app processes ready; serving on http://{host}:{port}", flush=True)
        threading.Thread(target=watch, args=(names,), daemon=True, name="starsql-watch").start()
        # What is left after a few seconds of stopping is cut.
        router = router_app([f"http://127.0.0.1:{p}" for p in ports])
        router_server(router, log_level="warning", timeout_graceful_shutdown=3).run(sockets=[listening])
        if ended:
            raise SystemExit(1)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping: a second SIGTERM must not cut this short
        ended.append("stopping")  # ends the watch
        _stop(children)


def _stop(children: list[subprocess.Popen], seconds: float = 20.0) -> None:
    """Ask every child to end (SIGTERM), wait `seconds` for them all, then kill the rest."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + seconds
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


_prctl = getattr(ctypes.CDLL(None), "prctl", None)  # Linux only
PR_SET_PDEATHSIG = 1


def _die_with_launcher() -> None:
    """In each child, before it runs (preexec_fn): SIGTERM it when the launcher dies, even by SIGKILL, which
    skips every `finally`, so that no model process is left holding the GPU."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

