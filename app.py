"""StarSQL: ask a question about your database in plain English, get SQL in your dialect back, checked.

    python app.py                                                  # bigcode/starcoder2-3b + $ADAPTER
    python app.py --base_model tiny-starcoder2 --adapter runs/tiny   # offline smoke run on a CPU
    python app.py --database postgresql://me@localhost/shop          # your live database (never on a Space by default)
    BASE_MODEL=bigcode/starcoder2-3b ADAPTER=USER/starcoder2-3b-sql python app.py

The same file is the Hugging Face Space (`python -m starsql.serve.deploy`). The model is loaded once, at
import: ZeroGPU wants it on CUDA at start-up and lends the GPU only while `generate` runs.
The database a request runs on is its uploaded file(s), else the live database the app was started
with, else the schema box (a dump in the chosen dialect): starsql/db/workspace.py opens it read-only,
within time, memory and row limits. The model writes the SQLite SQL it was trained on; the answer is
shown translated into the chosen dialect and checked there.

API (gradio_client): /sql(question, schema, dialect, database) -> {sql, valid, error, unknown_identifiers,
rows, ..., dialect, skipped}; /check(sql, schema, dialect, database), the same check without the model;
/chat(message, schema, history, max_new_tokens, temperature, dialect, database), which streams the reply.
"""

try:
    import spaces  # ZeroGPU; imported before torch, as it asks
except ImportError:
    spaces = None

import argparse
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import pandas as pd
import torch
from gradio.data_classes import FileData
from gradio.utils import get_upload_folder, is_in_or_equal

from starsql.db.dialects import DEFAULT_DIALECT, DIALECTS, ENGINE, DialectError, check_dialect, format_sql, translate
from starsql.db.live import connect, redact
from starsql.db.files import DATA_SUFFIXES, DATABASE_SUFFIXES, MAX_UPLOAD_BYTES
from starsql.db.workspace import Workspace, open_workspace
from starsql.prompt import build_prompt, extract_sql, fit_history
from starsql.sandbox import Budget, limit_heap
from starsql.schema import split_statements
from starsql.serve.check import (
    MAX_ROWS,
    TIME_LIMIT_S,
    CheckResult,
    SchemaError,
    looks_like_sql,
    statement_kind,
    text_problem,
)
from starsql.serve.decode import (BackendError, build_backend, decode_aoti, env_switch, fast_backend_wanted,
                                  freeze_long_lived_objects, statement_finished, usage_report)
from starsql.serve.gradio_sessions import lazy_session_configs
from starsql.serve.load import load_for_inference, load_tokenizer

DEFAULT_BASE = "bigcode/starcoder2-3b"
MAX_QUESTION_CHARS = 1_000
MAX_SCHEMA_CHARS = 100_000  # a real dump, COPY or INSERT rows included; the prompt gets its tables only
DEFAULT_NEW_TOKENS = 256
MAX_NEW_TOKENS = 512
MAX_TEMPERATURE = 2.0
MAX_HISTORY_TOKENS = 1_024  # earlier turns in the prompt; older ones are dropped first, and the user told
# SQLite's memory in the app's process, all sandboxes together (at most QUEUE concurrency + 1 at once).
SQLITE_HARD_HEAP_BYTES = 128 * 2**20
SQLITE_SOFT_HEAP_BYTES = 48 * 2**20
SHOWN_ROWS = 10  # rows of a result shown in the chat; the /sql API returns up to starsql.serve.check.MAX_ROWS
TABLE_ROWS = 1_000  # rows of a result in the UI's table, chart and CSV
CHART_ROWS = 50  # bars or points of a chart: the first rows of the result
QUEUE_SIZE = 100  # waiting requests before new ones are turned away
WRITING = "_Writing SQL…_"  # ends a reply while the model writes
STOPPED = "_Stopped._"  # ends a reply cut short by the Stop button
# The reply until the answer starts: with others' answers in flight the question waits in Gradio's
# queue, whose place-in-line counter (restyled in CSS to be read) shows on the chat meanwhile.
WAITING = "_**Waiting in line:** the model is answering other questions first. Your place in the queue shows below._"
STOP_POLL_S = 0.05  # how often a waiting answer looks at its Stop event
# A growing answer is sent at most this often, in the chat and through /chat: each update costs the server's one
# Python about a millisecond in Gradio, which many users streaming every token would saturate; readers need no more.
CHAT_UPDATE_S = 0.1
# Gradio recomputes its monitoring summary (a pandas table of up to its last 10,000 events) after each event by
# default: milliseconds of the server's one Python process an answer, more as events pile up. Once every this many
# events is enough for its /monitoring page; the variable, if set, decides.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
# Every plain API call starts a Gradio session, which builds the whole page's configuration and keeps it: with the
# switch on, a block's as an event writes it and the rest only for a deep link (starsql/serve/gradio_sessions.py).
if env_switch("LAZY_SESSIONS", True, "sessions build blocks' configurations as they are used", "Gradio's own sessions"):
    lazy_session_configs()
GPU_SECONDS = 60  # ZeroGPU lease per answer: 512 tokens of a 3B model fit easily
AOTI_COMPILE_S = 1500  # ZeroGPU lease to export and compile the decoder at start (DECODE_AOTI=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="StarSQL text-to-SQL app.")
    parser.add_argument("--base_model", default=os.environ.get("BASE_MODEL") or DEFAULT_BASE,
                        help="Hub id or folder of the base model (env BASE_MODEL); tiny-starcoder2 builds a tiny one.")
    parser.add_argument("--adapter", default=os.environ.get("ADAPTER", ""),
                        help="Hub id or folder of the LoRA adapter (env ADAPTER); empty serves the base alone.")
    parser.add_argument("--load_in_4bit", action="store_true",
                        default=os.environ.get("LOAD_IN_4BIT", "").lower() in ("1", "true", "yes"),
                        help="4-bit NF4 base for GPUs with little memory (env LOAD_IN_4BIT=1).")
    parser.add_argument("--inference_url", default=os.environ.get("INFERENCE_URL", ""),
                        help="An OpenAI-compatible endpoint (vLLM, TGI, transformers serve) that serves the model "
                             "(env INFERENCE_URL); the app then loads only the tokenizer. Its key: env INFERENCE_API_KEY.")
    parser.add_argument("--inference_model", default=os.environ.get("INFERENCE_MODEL", ""),
                        help="The model name the endpoint knows the adapter by (env INFERENCE_MODEL; default: --adapter, "
                             "else --base_model).")
    parser.add_argument("--inference_concurrency", type=int, default=int(os.environ.get("INFERENCE_CONCURRENCY", "8")),
                        help="Answers sent to the endpoint at once (env INFERENCE_CONCURRENCY); the queue holds the rest.")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS") or 1),
                        help="App processes (env WORKERS): above 1, the model runs in a process of its own and a router "
                             "on this address spreads users over that many app processes (starsql/serve/workers.py); "
                             "one Python process caps the answers a second it serves. Not on ZeroGPU.")
    parser.add_argument("--database", default=os.environ.get("DATABASE_URL", ""),
                        help="Your live database (env DATABASE_URL): postgresql://, mysql://, sqlite:///, duckdb:///. "
                             "Questions are answered and queries run on it, read-only. Off unless given; on a Space "
                             "DATABASE_URL is ignored unless DATABASE_ON_SPACE=1, since a Space is usually public.")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers (env WORKERS) must be 1 or more, not {args.workers}")
    return args


# Flags only when run as a script; `import app` (tests, Spaces' reloader) reads the env vars alone.
ARGS = parse_args(None if __name__ == "__main__" else [])
ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")
if __name__ == "__main__" and ARGS.workers > 1:
    if ZERO_GPU:  # each answer already runs in a GPU process of ZeroGPU's; there is no model process to share
        raise SystemExit("WORKERS above 1 needs a GPU of its own; on ZeroGPU leave it unset.")
    from starsql.serve.workers import serve_workers

    # This process only launches and routes: the model loads in its own process, the UI in the app processes.
    serve_workers(__file__, ARGS.workers,
                  engine_args=["--base_model", ARGS.base_model, *(["--adapter", ARGS.adapter] if ARGS.adapter else []),
                               *(["--load_in_4bit"] if ARGS.load_in_4bit else [])],
                  worker_env={"BASE_MODEL": ARGS.base_model, "ADAPTER": ARGS.adapter,
                              # an endpoint of the user's: their model name and concurrency (else the model's process's)
                              **({"INFERENCE_MODEL": ARGS.inference_model or ARGS.adapter or ARGS.base_model,
                                  "INFERENCE_CONCURRENCY": str(ARGS.inference_concurrency)} if ARGS.inference_url else {}),
                              **({"DATABASE_URL": ARGS.database} if ARGS.database else {})},
                  host=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                  port=int(os.environ.get("GRADIO_SERVER_PORT") or 7860), inference_url=ARGS.inference_url)  # fmt: skip
    raise SystemExit(0)
if ARGS.inference_url:
    # A thin front end: the endpoint generates; the prompt, checks and UI stay here.
    from starsql.serve.remote import RemoteBackend

    MODEL, TOKENIZER = None, load_tokenizer(ARGS.base_model, ARGS.adapter or None)
    BACKEND = RemoteBackend(ARGS.inference_url, ARGS.inference_model or ARGS.adapter or ARGS.base_model,
                            api_key=os.environ.get("INFERENCE_API_KEY"), concurrency=ARGS.inference_concurrency)
else:
    if ZERO_GPU:
        # Merge the adapter on the CPU (no GPU is attached at start-up), then place the bf16 weights
        # on CUDA as ZeroGPU asks; it lends a GPU only inside @spaces.GPU. bitsandbytes has no place here.
        MODEL, TOKENIZER = load_for_inference(ARGS.base_model, ARGS.adapter or None, device="cpu")
        MODEL = MODEL.to(torch.bfloat16).to("cuda")
    else:
        MODEL, TOKENIZER = load_for_inference(ARGS.base_model, ARGS.adapter or None, ARGS.load_in_4bit)
    BACKEND = build_backend(MODEL, TOKENIZER, fast=fast_backend_wanted(ARGS.load_in_4bit, ZERO_GPU))


def zero_gpu_aoti_backend(model, tokenizer):
    """ZeroGPU with DECODE_AOTI=1: the decoder exported and compiled once, at start, inside a GPU lease
    (spaces.aoti_compile); each answer's @spaces.GPU call then runs the compiled program. If that fails, a
    warning, and plain generate()."""
    from starsql.serve.fast.aoti import AotiDecodeBackend, AotiDecoder, cache_length, compile_decoder, export_decoder

    tokens = cache_length(model)

    @spaces.GPU(duration=AOTI_COMPILE_S)
    def compile_on_gpu():
        return compile_decoder(export_decoder(model, tokens), zero_gpu=True)

    try:
        return AotiDecodeBackend(model, tokenizer, AotiDecoder(compile_on_gpu(), tokens, model.device))
    except Exception as error:  # noqa: BLE001 -- the Space still answers, through generate()
        warnings.warn(f"The ahead-of-time compiled decoder is off ({type(error).__name__}: {error}); answers use "
                      "generate().", stacklevel=2)
        return BACKEND


if ZERO_GPU and spaces is not None and not ARGS.inference_url and decode_aoti():
    BACKEND = zero_gpu_aoti_backend(MODEL, TOKENIZER)



def live_database_url(url: str, environ=os.environ) -> str:
    """The live database to use: `url` (--database or DATABASE_URL), but not on a Space, where anyone
    who can open the app could query it, unless its owner sets DATABASE_ON_SPACE=1 as well."""
    if url and environ.get("SPACE_ID") and environ.get("DATABASE_ON_SPACE") != "1":
        print("DATABASE_URL is ignored on a Space (anyone could query it); set DATABASE_ON_SPACE=1 to use it.")
        return ""
    if url:
        print(f"Live database: {redact(url)}")
    return url


LIVE_URL = live_database_url(ARGS.database)


def gpu(duration: int):
    """spaces.GPU (a no-op off ZeroGPU), or a no-op where `spaces` is not installed."""
    return spaces.GPU(duration=duration) if spaces is not None else (lambda fn: fn)


@gpu(duration=GPU_SECONDS)
def generate(prompt: str, max_new_tokens: int, temperature: float) -> Iterator[str]:
    yield from BACKEND.stream(prompt, max_new_tokens, temperature)


# ---------------------------------------------------------------------------------------------
# Example databases: a CREATE TABLE per table, as the model was trained on, plus a few rows so
# that a valid query can be run and its result shown.

CONCERT_DB = """\
CREATE TABLE stadium (stadium_id INTEGER, name VARCHAR, location VARCHAR, capacity INTEGER);
CREATE TABLE singer (singer_id INTEGER, name VARCHAR, country VARCHAR, age INTEGER, is_male VARCHAR);
CREATE TABLE concert (concert_id INTEGER, concert_name VARCHAR, theme VARCHAR, stadium_id INTEGER, year INTEGER);
CREATE TABLE singer_in_concert (concert_id INTEGER, singer_id INTEGER);
INSERT INTO stadium VALUES (1, 'Stark''s Park', 'Raith Rovers', 10104), (2, 'Glebe Park', 'Brechin City', 3960), (3, 'Balmoor', 'Peterhead', 4000), (4, 'Hampden Park', 'Queen''s Park', 52500);
INSERT INTO singer VALUES (1, 'Joe Sharp', 'Netherlands', 52, 'F'), (2, 'Timbaland', 'United States', 32, 'T'), (3, 'Justin Brown', 'France', 29, 'T'), (4, 'Rose White', 'France', 41, 'F'), (5, 'John Nizinik', 'France', 43, 'T'), (6, 'Tribal King', 'France', 25, 'T');
INSERT INTO concert VALUES (1, 'Auditions', 'Free choice', 1, 2014), (2, 'Super bootcamp', 'Free choice 2', 2, 2014), (3, 'Home Visits', 'Bleeding Love', 2, 2015), (4, 'Week 1', 'Wide Awake', 3, 2014), (5, 'Week 2', 'Party All Night', 4, 2015);
INSERT INTO singer_in_concert VALUES (1, 2), (1, 3), (1, 5), (2, 3), (2, 6), (3, 5), (4, 4), (5, 6), (5, 3);
"""

COMPANY_DB = """\
CREATE TABLE department (department_id INTEGER, name VARCHAR, budget INTEGER);
CREATE TABLE employee (employee_id INTEGER, name VARCHAR, department_id INTEGER, salary INTEGER, hire_year INTEGER);
INSERT INTO department VALUES (1, 'Engineering', 900000), (2, 'Sales', 400000), (3, 'Support', 150000);
INSERT INTO employee VALUES (1, 'Ada', 1, 120000, 2019), (2, 'Linus', 1, 105000, 2021), (3, 'Grace', 1, 130000, 2017), (4, 'Ken', 2, 70000, 2022), (5, 'Barbara', 2, 82000, 2020), (6, 'Dennis', 3, 52000, 2023);
"""

SHOP_DB = """\
CREATE TABLE customer (customer_id INTEGER, name VARCHAR, city VARCHAR);
CREATE TABLE product (product_id INTEGER, name VARCHAR, category VARCHAR, price REAL);
CREATE TABLE orders (order_id INTEGER, customer_id INTEGER, product_id INTEGER, quantity INTEGER, order_date VARCHAR);
INSERT INTO customer VALUES (1, 'Amélie', 'Paris'), (2, 'Bruno', 'Lyon'), (3, 'Chloé', 'Paris'), (4, 'Diego', 'Madrid');
INSERT INTO product VALUES (1, 'Espresso machine', 'Kitchen', 249.0), (2, 'Grinder', 'Kitchen', 89.5), (3, 'Desk lamp', 'Office', 35.0), (4, 'Notebook', 'Office', 4.5);
INSERT INTO orders VALUES (1, 1, 1, 1, '2024-01-12'), (2, 1, 4, 10, '2024-02-03'), (3, 2, 2, 2, '2023-11-20'), (4, 3, 3, 1, '2024-03-15'), (5, 4, 4, 25, '2024-03-20'), (6, 3, 2, 1, '2023-12-24');
"""

# (label, question, schema): from a simple count to joins, grouping, ordering and nested queries.
EXAMPLES = [
    ("Count", "How many singers do we have?", CONCERT_DB),
    ("Filter and order", "List the name and age of every singer from France, oldest first.", CONCERT_DB),
    ("Aggregates", "What is the average, minimum and maximum age of the singers from France?", CONCERT_DB),
    ("Join and group", "How many concerts were held in each stadium? Show the stadium name and the count.", CONCERT_DB),
    ("Top one", "Which year had the most concerts?", CONCERT_DB),
    ("Nested query", "List the names of singers who did not perform in any concert.", CONCERT_DB),
    ("Having", "Which departments have more than 2 employees? Show the name and the number of employees.", COMPANY_DB),
    ("Subquery", "Who earns more than the average salary? List their names and salaries.", COMPANY_DB),
    ("Revenue ranking", "What are the three products with the highest total revenue (price times quantity)?", SHOP_DB),
    ("Join and filter", "Which customers from Paris ordered something in 2024?", SHOP_DB),
]


# ---------------------------------------------------------------------------------------------
# The user's database: uploaded files, else the live database the app was started with, else the
# schema box (a dump in the chosen dialect). One Workspace per request, closed when it ends.

def uploaded_files(database) -> list[str]:
    """Paths of the files a request brings: gr.File hands over paths, the API FileData dicts
    (gradio_client's handle_file). Either way the file must lie in Gradio's upload folder, so that
    no request can make the app open a file of the server."""
    items = [] if database in (None, "", []) else database if isinstance(database, list) else [database]
    paths = []
    for item in items:
        path = item.get("path") if isinstance(item, dict) else item
        if not isinstance(path, str) or not is_in_or_equal(path, get_upload_folder()):
            raise ValueError("`database` must be a file sent with the request: "
                             "handle_file('shop.sqlite') from gradio_client, or the upload box.")
        paths.append(path)
    return paths


def open_request(schema, dialect, database, seconds: "float | Budget" = TIME_LIMIT_S,
                 schema_needed: bool = True) -> Workspace:
    """The request's database. Raises ValueError whose message says what to fix: an unknown dialect,
    a file that was not uploaded or is no database, a schema that does not load, a database out of reach."""
    dialect, files = check_dialect(dialect), uploaded_files(database)
    problem = schema_problem(schema, needed=schema_needed and not files and not LIVE_URL)
    if problem:
        raise ValueError(problem)
    if files:
        return open_workspace("", dialect, database=files[0] if len(files) == 1 else files, seconds=seconds)
    if LIVE_URL:
        return open_workspace("", dialect, url=LIVE_URL, seconds=seconds)
    try:
        return open_workspace(schema, dialect, seconds=seconds)
    except SchemaError as error:  # its message already names the dialect a pasted dump looks like
        raise ValueError(f"The schema does not load. {error}") from None


# Closing a request's database can take a while (a DuckDB worker collects the request's garbage before it
# serves the next one): it is done here, in a thread of its own, so that the reply goes out first.
_CLOSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="starsql-close")


def close_later(workspace: Workspace) -> None:
    _CLOSER.submit(workspace.close)


def prompt_schema(schema: str, workspace: Workspace, database) -> str:
    """What the model is prompted with: the database's normalised tables; with a file or a live
    database, the schema box instead where the user has written one (filled from the database,
    maybe trimmed to the tables that matter), its CREATE statements only."""
    if (database or LIVE_URL) and schema.strip():
        return "\n".join(s for s in split_statements(schema) if s.lstrip().upper().startswith("CREATE"))
    return workspace.schema_text


def skipped_lines(workspace: Workspace) -> list[str]:
    return [f"line {s.line} (`{s.words}`): {s.reason}" for s in workspace.skipped]


def database_name(database) -> str:
    """Where the data comes from, for messages: the files' names, or the live URL without its password."""
    files = uploaded_files(database)
    if files:
        return ", ".join(f"`{Path(path).name}`" for path in files)
    return f"`{redact(LIVE_URL)}`" if LIVE_URL else ""


# ---------------------------------------------------------------------------------------------
# The work: plain functions the UI and the API call.

def text_box_problem(text, what: str, limit: int, blank: str | None) -> str | None:
    """What is wrong with a text box's content, in words, or None: blank (when `blank` says what to
    write instead), no text, characters nothing downstream can take, too long."""
    if blank and isinstance(text, str) and not text.strip():
        return blank
    problem = text_problem(text, what)
    if problem:
        return problem
    if len(text) > limit:
        return f"The {what} is {len(text):,} characters long; at most {limit:,} are allowed."
    return None


def schema_problem(schema, needed: bool = True) -> str | None:
    """`needed`: no uploaded file or live database stands in for the schema box."""
    return text_box_problem(schema, "schema", MAX_SCHEMA_CHARS, blank=needed and (
        "Please put the database schema (CREATE TABLE statements, or a dump) in the schema box, "
        "or upload a database file."))


def input_problem(question) -> str | None:
    return text_box_problem(question, "question", MAX_QUESTION_CHARS, "Please type a question about the database.")


def history_problem(history) -> str | None:
    """What is wrong with `history` (earlier [question, sql] pairs), or None."""
    example = '[["How many singers?", "SELECT count(*) FROM singer"]]'
    if not isinstance(history, list) or not all(
        isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history
    ):
        return f"`history` must be a list of [question, sql] pairs: {example}."
    for number, turn in enumerate(history, start=1):
        for text, what in zip(turn, ("question", "SQL")):
            problem = text_problem(text, f"{what} of history turn {number}")
            if problem:
                return problem
    return None


def _number(value, integer: bool) -> float | None:
    """A finite number (a whole one if `integer`), or None. Booleans and strings are not numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if integer and value != int(value):
        return None
    return int(value) if integer else float(value)


def settings_problem(max_new_tokens, temperature) -> str | None:
    tokens = _number(max_new_tokens, integer=True)
    if tokens is None or not 1 <= tokens <= MAX_NEW_TOKENS:
        return f"`max_new_tokens` must be a whole number from 1 to {MAX_NEW_TOKENS}; got {max_new_tokens!r}."
    heat = _number(temperature, integer=False)
    if heat is None or not 0 <= heat <= MAX_TEMPERATURE:
        return f"`temperature` must be a number from 0 (greedy) to {MAX_TEMPERATURE:g}; got {temperature!r}."
    return None


def count_tokens(text: str) -> int:
    return len(TOKENIZER(text, add_special_tokens=False)["input_ids"])


def pieces_until_stopped(stream: Iterator[str], stopped, every: float | None = None) -> Iterator[str]:
    """The stream's pieces (each the text so far) until it ends or `stopped()`, at most one every `every` seconds
    (default CHAT_UPDATE_S): the first at once, then the newest when its interval is over, whether or not more
    came meanwhile; the last always. The stream is read in a thread of its own, so Stop is seen within
    STOP_POLL_S even while the model is still on a piece (a streamer yields whole words); that thread closes
    the stream, which ends the generation, at its next piece."""
    every = CHAT_UPDATE_S if every is None else every
    pieces: queue.Queue = queue.Queue()
    end, gone = object(), threading.Event()  # gone: nobody reads any more (Stop, or the client left)

    def pump() -> None:
        try:
            for piece in stream:
                pieces.put(piece)
                if gone.is_set() or stopped():
                    break
        except Exception as error:  # noqa: BLE001 -- handed to the reader, which raises it
            pieces.put(error)
        finally:
            try:
                getattr(stream, "close", lambda: None)()
            finally:
                pieces.put(end)

    threading.Thread(target=pump, daemon=True, name="starsql-stream").start()
    pending, passed_at = None, float("-inf")  # the newest text not passed on yet; when the last one was
    try:
        while not stopped():
            wait = STOP_POLL_S
            if pending is not None:
                wait = passed_at + every - time.monotonic()
                if wait <= 0:
                    yield pending
                    pending, passed_at = None, time.monotonic()
                    continue
                wait = min(wait, STOP_POLL_S)
            try:
                item = pieces.get(timeout=wait)
            except queue.Empty:
                continue
            while isinstance(item, str):  # of the pieces that piled up, the newest
                pending = item
                try:
                    item = pieces.get_nowait()
                except queue.Empty:
                    item = None
            if item is None:
                continue
            if pending is not None:  # the end, or an error: the newest text first
                yield pending
            if item is end:
                return
            raise item
    finally:
        gone.set()


def in_sqlite(sql: str, dialect: str) -> str:
    """An earlier answer, shown in `dialect`, as the SQLite SQL the model writes (for its prompt)."""
    try:
        return translate(sql, "sqlite", read=dialect)
    except (DialectError, RecursionError):
        return sql


def checked(workspace: Workspace, raw: str, max_rows: int) -> CheckResult:
    """The model's SQLite SQL in the workspace's dialect, formatted, and checked there."""
    try:
        shown = translate(raw, workspace.dialect, schema=workspace.tables)
    except (DialectError, RecursionError):
        return CheckResult(sql=raw, error=f"The model's answer cannot be shown in {workspace.dialect}: it is not SQL "
                                          "that sqlglot can read as SQLite. Try rephrasing the question.")
    pretty = format_sql(shown, workspace.dialect)
    check = workspace.check(pretty, max_rows)
    if not check.valid and pretty != shown and not check.stopped:  # sqlglot's layout must never be what breaks it
        check = workspace.check(shown, max_rows)
    return check


def described(check: CheckResult, workspace: Workspace) -> CheckResult:
    """`check` with what its workspace knows: the dialect, the schema statements it skipped, and
    (`total_rows`, not part of the API's JSON) how many rows the result has when they were cut at the cap."""
    check.dialect = workspace.dialect
    check.skipped = check.skipped or skipped_lines(workspace)
    check.total_rows = count_rows(workspace, check.sql) if check.truncated else None
    return check


def count_rows(workspace: Workspace, sql: str) -> int | None:
    """How many rows `sql` returns in all (for "first N of M rows"), or None if that cannot be counted in time."""
    counted = workspace.check(f"SELECT COUNT(*) FROM (\n{sql}\n) AS result_rows", 1)
    return counted.rows[0][0] if counted.rows and isinstance(counted.rows[0][0], int) else None


def answer(question: str, schema: str, history: list[tuple[str, str]] | None = None,
           max_new_tokens: int = DEFAULT_NEW_TOKENS, temperature: float = 0.0,
           stop: threading.Event | None = None, dialect: str = DEFAULT_DIALECT, database=None,
           max_rows: int = MAX_ROWS) -> Iterator[tuple[str, CheckResult | None]]:
    """Stream (SQL so far, None) while the model writes, then (final SQL, its check).

    Bad input or output ends in a CheckResult whose `error` says what went wrong. The database is
    opened once, before the model writes; opening, listing and checking share TIME_LIMIT_S. The
    final check is `described`. Setting `stop` ends the answer within a token (or a SQLite progress step), with `stopped` set."""
    problem = (input_problem(question) or history_problem(history or [])
               or settings_problem(max_new_tokens, temperature))
    if problem:
        yield "", CheckResult(sql="", error=problem, dialect=str(dialect))
        return
    stopped = stop.is_set if stop is not None else (lambda: False)
    try:
        workspace = open_request(schema, dialect, database, Budget(TIME_LIMIT_S, cancelled=stopped))
    except ValueError as error:
        yield "", CheckResult(sql="", error=str(error), stopped=stopped(), dialect=str(dialect))
        return
    try:
        if not workspace.tables:
            yield "", described(CheckResult(sql="", error="The schema has no tables: add CREATE TABLE statements."),
                                workspace)
            return
        history = [(q, in_sqlite(s, workspace.dialect)) for q, s in history or []]
        history, dropped = fit_history(history, count_tokens, MAX_HISTORY_TOKENS)
        prompt = build_prompt(prompt_schema(schema, workspace, database), question, history)
        text = ""
        try:
            for piece in pieces_until_stopped(generate(prompt, int(max_new_tokens), float(temperature)), stopped):
                if stopped():
                    break  # what was shown last stays the answer
                text = piece
                yield extract_sql(text), None
        except BackendError as error:  # an endpoint down, slow or refusing: say so, keep what was written
            sql = extract_sql(text)
            yield sql, described(CheckResult(sql=sql, error=str(error), dropped_turns=dropped), workspace)
            return
        raw = extract_sql(text)
        if stopped():
            yield raw, described(CheckResult(sql=raw, error="Stopped.", stopped=True, dropped_turns=dropped), workspace)
            return
        cut = not statement_finished(text) and count_tokens(text) >= max_new_tokens
        problem = text_problem(raw, "model's answer")
        if problem or not looks_like_sql(raw):
            error = (f"{problem} Ask again." if problem else
                     "The model did not produce SQL. Try rephrasing the question, or name the tables and columns you mean.")
            shown = raw.replace("\x00", "\\x00") if problem and "\x00" in raw else ("" if problem else raw)
            yield shown, described(CheckResult(sql=shown, error=error, cut=cut, dropped_turns=dropped), workspace)
            return
        check = described(checked(workspace, raw, max_rows), workspace)
        check.cut, check.dropped_turns = cut, dropped
        yield check.sql, check
    finally:
        close_later(workspace)


def changed_sql(answers: Iterator[tuple[str, CheckResult | None]]) -> Iterator[tuple]:
    """answer()'s stream without the updates that change no SQL (a piece that added a space, or half a word);
    the final answer always."""
    shown = None
    for sql, check in answers:
        if check is None and sql == shown:
            continue
        shown = sql
        yield sql, check


def check_request(sql, schema, dialect=DEFAULT_DIALECT, database=None, max_rows: int = MAX_ROWS) -> CheckResult:
    """`sql`, written in `dialect`, checked and run on the request's database: the check without the model."""
    try:
        workspace = open_request(schema, dialect, database)
    except ValueError as error:
        return CheckResult(sql="", error=str(error), dialect=str(dialect))
    try:
        return described(workspace.check(sql, max_rows), workspace)
    finally:
        close_later(workspace)


def markdown_table(columns: list[str], rows: list[list], limit: int = SHOWN_ROWS) -> str:
    def cell(value) -> str:
        return "NULL" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows[:limit]]
    return "\n".join(lines)


def notes_markdown(check: CheckResult) -> list[str]:
    """What the user should know about how the answer was made: cut short, history shortened."""
    notes = []
    if check.cut:
        notes.append("✂ **Cut short:** the model reached *Max new tokens* before the statement's end, "
                     "so the SQL may be incomplete. Raise *Max new tokens* and ask again.")
    if check.dropped_turns:
        turns = f"{check.dropped_turns} earlier turn{'s' if check.dropped_turns != 1 else ''}"
        notes.append(f"_The conversation is long: the model saw the latest turns only ({turns} left out, "
                     f"a {MAX_HISTORY_TOKENS:,}-token budget). Press Clear to start afresh._")
    return notes


def rows_text(count: int, truncated: bool, total: int | None) -> str:
    """'7 rows', 'first 1,000 of 25,310 rows', or 'first 50 rows' when the total is not known."""
    rows = f"row{'s' if (total or count) != 1 else ''}"
    if not truncated:
        return f"{count:,} {rows}"
    return f"first {count:,} of {total:,} {rows}" if total else f"first {count:,} {rows}; there are more"


def reply_markdown(sql: str, check: CheckResult | None) -> str:
    """The assistant's message: the SQL in a ```sql block, then the verdict and any result."""
    if check is None:  # still writing
        return f"```sql\n{sql}\n```\n{WRITING}" if sql else WRITING
    if check.stopped:  # the SQL as far as it got, and no verdict
        return "\n\n".join([f"```sql\n{sql}\n```\n{STOPPED}" if sql else STOPPED, *notes_markdown(check)])
    if not check.sql:  # bad input: nothing was generated
        return "\n\n".join([f"⚠ {check.error}", *notes_markdown(check)])
    if not looks_like_sql(check.sql) and check.error:
        shown = check.sql if len(check.sql) <= 300 else check.sql[:300] + "…"
        return "\n\n".join([f"{check.error}\n\nIt wrote: `{shown.replace('`', '')}`", *notes_markdown(check)])
    parts = [f"```sql\n{check.sql}\n```"]
    if check.writes_data and check.valid:
        kind = statement_kind(check.sql, check.dialect) or "this statement"
        parts.append(f"⚠ **Changes the database ({kind}).** Valid for this schema, but not run. "
                     "Review it before running it on a real database.")
    elif not check.valid:
        parts.append(f"✗ **Not valid for this schema** ({check.dialect}): {check.error}")
    else:
        parts.append(f"✓ **Valid for this schema** ({check.dialect}).")
    if check.unknown_identifiers:
        names = ", ".join(f"`{name}`" for name in check.unknown_identifiers)
        parts.append(f"Not in the schema: {names}")
    if check.valid and check.not_verified and ENGINE.get(check.dialect, check.dialect) != check.dialect:
        parts.append(f"_{check.not_verified}_")  # checked by another engine: what it cannot see
    if check.valid and not check.writes_data:
        if check.error:  # ran into the time limit
            parts.append(check.error)
        elif check.rows is not None:
            count = rows_text(len(check.rows), check.truncated, getattr(check, "total_rows", None))  # see described()
            parts.append(f"Result ({count}):\n\n" + markdown_table(check.columns, check.rows))
            if len(check.rows) > SHOWN_ROWS:
                parts.append(f"_…first {SHOWN_ROWS} shown._")
    return "\n\n".join(parts + notes_markdown(check))


def api_schema(schema: str | None, database) -> str:
    """An API call's schema: the concert example where a caller gives neither a schema nor a database
    (what /sql and /chat always did), nothing where a database says what its tables are."""
    if schema is None:
        return "" if database not in (None, "", []) or LIVE_URL else CONCERT_DB
    return schema


def sql_api(question: str, schema: str | None = None, dialect: str = DEFAULT_DIALECT,
            database: FileData | list[FileData] | None = None, max_new_tokens: int = DEFAULT_NEW_TOKENS) -> dict:
    """SQL for `question`, greedy, in `dialect`, checked: {sql, valid, error, unknown_identifiers,
    rows, columns, writes_data, truncated, cut, ..., dialect, skipped}. The database is `database`
    (a file sent with handle_file: .sqlite, .db, .duckdb, .csv, .parquet, .jsonl; `schema` may then
    be empty), else `schema` (CREATE TABLE statements or a dump in `dialect`; `rows` holds the
    result on its rows). `cut` is true when the model stopped at `max_new_tokens` before the statement's end."""
    *_, (_, check) = answer(question, api_schema(schema, database), max_new_tokens=max_new_tokens, dialect=dialect,
                            database=database)  # the last item holds the check
    return check.to_dict()


def check_api(sql: str, schema: str = "", dialect: str = DEFAULT_DIALECT, database: FileData | list[FileData] | None = None) -> dict:
    """Check and run `sql`, written in `dialect`, without the model: the same JSON as /sql. The
    database is `database` (a file sent with handle_file), else `schema`."""
    return check_request(sql, schema, dialect, database).to_dict()


def chat_api(message: str, schema: str | None = None, history: list[list[str]] | None = None,
             max_new_tokens: int = DEFAULT_NEW_TOKENS, temperature: float = 0.0, dialect: str = DEFAULT_DIALECT,
             database: FileData | list[FileData] | None = None) -> Iterator[str]:
    """Stream the reply (markdown: SQL, verdict, result). `history` holds earlier [question, sql]
    pairs; the latest that fit MAX_HISTORY_TOKENS go into the prompt, and the reply says if any did not."""
    history = [] if history is None else history
    problem = history_problem(history)
    if problem:
        yield f"⚠ {problem}"
        return
    for sql, check in changed_sql(answer(message, api_schema(schema, database), [(q, s) for q, s in history], max_new_tokens,
                                   temperature, dialect=dialect, database=database)):
        yield reply_markdown(sql, check)


def usage_api() -> dict:
    """Tokens generated and answers given since the app started (`tokens`, `answers`): the load, for operators.
    With the batched decoder, also its engine's totals (`decoder`: steps, rows decoded, seconds stepping,
    prefill forwards, requests prefilled, seconds prefilling): where a slow load spends its time."""
    engine = getattr(BACKEND, "usage", None)  # an endpoint of ours (starsql.serve.engine_server) counts its own
    return (engine and engine()) or usage_report(BACKEND)


# ---------------------------------------------------------------------------------------------
# Results people can look at: a table, a chart when the result is a label or a time with numbers,
# and the rows as CSV.

_TIME_TEXT = re.compile(r"^\d{4}-\d{2}(-\d{2})?([ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?")
_YEAR_NAME = re.compile(r"(^|_)years?($|_)", re.IGNORECASE)


def result_frame(columns: list[str], rows: list[list]) -> pd.DataFrame:
    """The rows as a DataFrame; repeated column names (a.name, b.name) numbered, as tables and charts need."""
    seen: dict[str, int] = {}
    names = []
    for name in columns:
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return pd.DataFrame(rows, columns=names)


def _numbers(values) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present)


def _times(name: str, values) -> bool:
    present = [v for v in values if v is not None]
    if not present:
        return False
    if all(isinstance(v, str) and _TIME_TEXT.match(v) for v in present):  # results carry dates as ISO text
        return True
    return bool(_YEAR_NAME.search(name)) and all(str(v).isdigit() and 1000 <= int(v) <= 9999 for v in present)


def chart_of(names: list[str], rows: list[list]) -> tuple[str, str, str] | None:
    """("line", time, number) when a column is a time and another a number; ("bar", label,
    number) when one is a label; else None (one column, only numbers, no rows)."""
    if not rows or len(names) < 2:
        return None
    columns = {name: [row[i] for row in rows] for i, name in enumerate(names)}
    times = [name for name, values in columns.items() if _times(name, values)]
    numbers = [name for name, values in columns.items() if _numbers(values) and name not in times]
    labels = [name for name, values in columns.items() if name not in times and name not in numbers]
    if times and numbers:
        return "line", times[0], numbers[0]
    if labels and numbers:
        return "bar", labels[0], numbers[0]
    return None


def verdict_line(check: CheckResult) -> str:
    """The result area's first line: the check's verdict in short, and how many rows came back."""
    if not check.valid:
        return f"✗ **Not valid** ({check.dialect}): {check.error}"
    if check.writes_data:
        return f"⚠ **Changes the database:** valid ({check.dialect}), not run."
    if check.rows is None:
        return f"✓ **Valid** ({check.dialect})" + (f": {check.error}" if check.error else "; no rows to run it on.")
    total = getattr(check, "total_rows", None)
    return f"✓ **Valid** ({check.dialect}): {rows_text(len(check.rows), check.truncated, total)}" + (
        " (the table, the chart and the CSV hold these)." if check.truncated else ".")


def result_view(check: CheckResult | None, folder: str) -> tuple:
    """Updates of the result area (box, SQL, verdict, table, bar chart, line chart, CSV button):
    hidden when there is no SQL; the table, chart and CSV only when rows came back. The CSV is written into `folder`."""
    if check is None or not check.sql:
        return gr.update(visible=False), *(gr.skip(),) * 6
    hidden = gr.update(visible=False)
    # A plot stays mounted, hidden by CSS: Gradio's plot reads its removed element's width if unmounted
    # (visible=False), and visible="hidden" still shows an empty plot when the result area first appears.
    plot_hidden = gr.update(visible=True, elem_classes=[PLOT_OFF])
    if check.rows is None or not check.columns:
        return gr.update(visible=True), check.sql, verdict_line(check), hidden, plot_hidden, plot_hidden, hidden
    frame = result_frame(check.columns, check.rows)
    csv_path = Path(folder) / "result.csv"
    frame.to_csv(csv_path, index=False)
    bar = line = plot_hidden
    chart = chart_of(list(frame.columns), check.rows[:CHART_ROWS])
    if chart:
        kind, x, y = chart
        shown = frame.head(CHART_ROWS)
        if kind == "line":  # on a time axis: dates and times as they are, years as 1 January of the year
            years = pd.api.types.is_numeric_dtype(shown[x])
            shown = shown.assign(**{x: pd.to_datetime(shown[x].astype("Int64").astype(str) if years else shown[x],
                                                      format="%Y" if years else None, errors="coerce")})
            line = gr.update(value=shown, x=x, y=y, visible=True, elem_classes=[], title=f"{y} by {x}")
        else:  # the bars in the result's order, from zero
            shown = shown.assign(**{x: shown[x].astype(str)})
            low, high = min(0, shown[y].min()), max(0, shown[y].max())
            bar = gr.update(value=shown, x=x, y=y, visible=True, elem_classes=[], title=f"{y} by {x}", y_lim=[low, high or 1],
                            sort=list(dict.fromkeys(shown[x])))
    return (gr.update(visible=True), check.sql, verdict_line(check), gr.update(value=frame, visible=True), bar, line,
            gr.update(value=str(csv_path), visible=True))


def run_sql(sql: str, schema: str, dialect: str, files) -> Iterator[tuple]:
    """The Run button under the SQL: the user's own SQL (maybe the answer, edited) checked and run like an answer's."""
    folder = tempfile.mkdtemp(prefix="starsql-result-")
    check = check_request(sql, schema, dialect, files, TABLE_ROWS)
    check.sql = check.sql or sql  # a database that did not open: its message, under the SQL as typed
    try:
        _, _, *view = result_view(check, folder)
        yield tuple(view)
    finally:  # Gradio has copied the CSV into its cache by now
        shutil.rmtree(folder, ignore_errors=True)


_SQL_BLOCK = re.compile(r"```sql\n(.*?)\n```", re.DOTALL)


def message_text(content) -> str:
    """A chat message's text, whether Gradio hands over a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    return "\n".join(message_text(part) for part in content or [])


def history_pairs(messages: list[dict]) -> list[tuple[str, str]]:
    """Earlier (question, sql) turns of the chat, for a follow-up question's prompt."""
    pairs, question = [], None
    for message in messages or []:
        text = message_text(message.get("content"))
        if message.get("role") == "user":
            question = text
        elif question is not None and WRITING not in text and STOPPED not in text and (block := _SQL_BLOCK.search(text)):
            pairs.append((question, block.group(1)))
            question = None
    return pairs


# Stop: each browser session's current answer has an Event that the Stop button sets; the answer
# checks it between tokens (and SQLite between steps) and ends with its own "Stopped" message, so
# what the chat shows last always comes from the answer itself.
_STOP_EVENTS: "OrderedDict[str, threading.Event]" = OrderedDict()
_STOP_LOCK = threading.Lock()
MAX_SESSIONS = 10_000  # sessions remembered; the oldest are forgotten first


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or ""


def start_turn(request: gr.Request | None) -> threading.Event:
    """A new answer for this session: a fresh Stop event (an older answer of the session is stopped)."""
    with _STOP_LOCK:
        old = _STOP_EVENTS.pop(_session(request), None)
        if old is not None:
            old.set()
        event = _STOP_EVENTS[_session(request)] = threading.Event()
        while len(_STOP_EVENTS) > MAX_SESSIONS:
            _STOP_EVENTS.popitem(last=False)
    return event


def request_stop(request: gr.Request) -> None:
    """The Stop button: the session's current answer ends within a token."""
    with _STOP_LOCK:
        event = _STOP_EVENTS.get(_session(request))
    if event is not None:
        event.set()


def take_question(text: str, messages: list[dict], request: gr.Request) -> tuple:
    """Ask or Enter, at once (not queued): move the question out of the box into the chat, with a
    note that it waits in line until respond() starts on it, and lock Ask and the box until the answer is written."""
    start_turn(request)
    if isinstance(text, str) and text.strip():
        messages = [*(messages or []), {"role": "user", "content": text}, {"role": "assistant", "content": WAITING}]
    return gr.update(value="", interactive=False), text, gr.update(interactive=False), messages


def respond(question: str, messages: list[dict], schema: str, dialect: str, files, max_new_tokens: int,
            decoding: str, temperature: float, request: gr.Request = None) -> Iterator[tuple]:
    """The chat: append the question, stream the answer into the last message; then the result
    area (table, chart, CSV) for the final answer."""
    messages = list(messages or [])
    if messages and message_text(messages[-1].get("content")) == WAITING:  # take_question's, replaced here
        messages = messages[:-2]
    unchanged = (gr.skip(),) * 7
    if not isinstance(question, str) or not question.strip():  # nothing to answer: a notice, the chat unchanged
        gr.Warning(input_problem(question))
        yield messages, *unchanged
        return
    with _STOP_LOCK:
        stop = _STOP_EVENTS.get(_session(request)) if request is not None else None
    temperature = temperature if decoding == "Sample" else 0.0
    history = history_pairs(messages)
    messages.append({"role": "user", "content": question})
    folder = tempfile.mkdtemp(prefix="starsql-result-")
    try:
        for sql, check in changed_sql(answer(question, schema, history, max_new_tokens, temperature, stop, dialect, files,
                                       max_rows=TABLE_ROWS)):
            reply = messages + [{"role": "assistant", "content": reply_markdown(sql, check)}]
            yield (reply, *unchanged) if check is None else (reply, *result_view(check, folder))
    finally:  # Gradio has copied the CSV into its cache by now
        shutil.rmtree(folder, ignore_errors=True)


def describe_schema(schema: str, dialect: str = DEFAULT_DIALECT, files=None) -> str:
    """One line under the schema box: what the database holds and where it comes from, or what to fix."""
    try:
        workspace = open_request(schema, dialect, files, schema_needed=False)
    except ValueError as error:
        return f"⚠ {error}"
    workspace.close()
    if not workspace.tables:
        return "⚠ No tables yet: add CREATE TABLE statements, or upload a database file."
    names = ", ".join(f"`{table.name}`" for table in workspace.tables[:12]) + (", …" if len(workspace.tables) > 12 else "")
    tables = f"{len(workspace.tables)} table{'s' if len(workspace.tables) != 1 else ''} ({names})"
    source = database_name(files)
    if source:
        rows = f", {workspace.rows:,} rows" if uploaded_files(files) else ""  # a live database is not counted
        data = (f"from {source}{rows}: queries run on it, read-only; "
                "the schema box is what the model sees (edit it freely)")
    else:
        data = (f"{workspace.rows:,} example rows: valid queries are run on them" if workspace.rows
                else "no rows: add INSERTs to see results")
    line = f"✓ {tables}; {data}."
    if workspace.skipped:
        words = ", ".join(f"`{s.words}`" for s in workspace.skipped[:3]) + (", …" if len(workspace.skipped) > 3 else "")
        count = len(workspace.skipped)
        line += f"\n\n_Skipped {count} statement{'s' if count != 1 else ''} that hold{'s' if count == 1 else ''} " \
                f"no schema or data: {words}._"
    return line


def schema_from_upload(files, dialect: str):
    """The schema box filled from uploaded files (their tables as the model sees them), or unchanged
    when the files do not open: a notice says why (and the line under the box, until they are removed)."""
    try:
        workspace = open_request("", dialect, files, schema_needed=False)
    except ValueError as error:
        gr.Warning(str(error))
        return gr.skip()
    workspace.close()
    return workspace.schema_text


def live_schema() -> tuple[str, str]:
    """The live database's (schema text, dialect) for the page's first view; ("", sqlite) if it is out of reach."""
    if not LIVE_URL:
        return CONCERT_DB, DEFAULT_DIALECT
    try:
        workspace = open_workspace("", connect(LIVE_URL).dialect, url=LIVE_URL)
    except ValueError as error:
        print(f"The live database cannot be read: {error}")
        return "", DEFAULT_DIALECT
    workspace.close()
    return workspace.schema_text, workspace.dialect


def about_markdown() -> str:
    def link(name: str) -> str:
        on_hub = "/" in name and not os.path.exists(name)
        return f"[{name}](https://huggingface.co/{name})" if on_hub else f"`{name}`"

    model = f"{link(ARGS.adapter)} (LoRA on {link(ARGS.base_model)})" if ARGS.adapter else link(ARGS.base_model)
    live = f"\n\n**Live database:** `{redact(LIVE_URL)}`, read-only." if LIVE_URL else ""
    return f"""\
**Model:** {model}. It reads your tables (CREATE TABLE statements, whatever dialect they came in) and your
question, and writes one SQLite statement, shown translated into the dialect you chose.

**Check:** the SQL is checked in that dialect's meaning on an embedded engine (SQLite, or DuckDB for the
PostgreSQL-like family): valid or not, which tables and columns your schema lacks. A read-only query runs
on your data (an uploaded file, the live database, or the schema box's INSERT or COPY rows) for
{TIME_LIMIT_S:g} s at most; the first {TABLE_ROWS:,} result rows are shown. Statements that would change
data are flagged and never run. Uploaded files are never changed.{live}

**Limitations:** the model can be wrong, even when the SQL is valid: review the SQL before running it on
real data. Questions up to {MAX_QUESTION_CHARS:,} characters, schemas up to {MAX_SCHEMA_CHARS:,}, uploads up to
{MAX_UPLOAD_BYTES // 2**20:,} MB.

**API:** `Client(url).predict(question, schema, dialect, handle_file("shop.sqlite"), api_name="/sql")` returns
JSON; `/check` checks your own SQL the same way; `/chat` streams the reply (see "Use via API" at the bottom of the page)."""


# ---------------------------------------------------------------------------------------------
# The UI, declared in one place.

PLOT_OFF = "plot-off"  # the class of a chart the result has none for (CSS below)
CSS = """
.plot-off { display: none !important; }
#chat table th, #chat table td { padding: 4px 12px !important; font-size: 0.92em; }
#chat [data-testid="status-tracker"] .progress-text { font-size: var(--text-md); font-weight: 600;
    color: var(--body-text-color); background: var(--color-accent-soft); padding: 2px 10px; border-radius: var(--radius-md); }
"""
FIRST_SCHEMA, FIRST_DIALECT = live_schema()
UPLOAD_LABEL = f"Your database, up to {MAX_UPLOAD_BYTES // 2**20:,} MB a file"
UPLOAD_NOTE = ("_A .sqlite, .db or .duckdb file, or data files (.csv, .parquet, .jsonl: a table each, named after "
               "the file). Read-only: your file is never changed._")

with gr.Blocks(title="StarSQL: English to SQL") as demo:
    gr.Markdown("# ★ StarSQL · ask your database in English\n"
                "Upload your database or paste its schema on the right, choose your SQL dialect, ask a question: "
                "get SQL checked against your data. Follow-up questions build on the conversation.")
    # Rendered in the right column below; created first so the examples under the chat can fill them.
    schema = gr.Code(FIRST_SCHEMA, language="sql", label="Database schema (or a dump: pg_dump, mysqldump, .schema)",
                     lines=12, max_lines=20, interactive=True, wrap_lines=True, elem_id="schema", render=False)
    upload = gr.File(label=UPLOAD_LABEL, file_types=[*DATABASE_SUFFIXES, *DATA_SUFFIXES], file_count="multiple",
                     elem_id="upload", render=False)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            chat = gr.Chatbot(elem_id="chat", label="Conversation", height=520, buttons=["copy_all"],
                              placeholder="**Ask a question** below, or click an example.")
            with gr.Row():
                question = gr.Textbox(placeholder="e.g. Which singers are older than 40?", show_label=False,
                                      scale=6, max_length=MAX_QUESTION_CHARS, autofocus=True, container=False)
                ask = gr.Button("Ask", variant="primary", scale=1, min_width=80)
                stop = gr.Button("Stop", variant="stop", scale=1, min_width=80)
                clear = gr.ClearButton([chat, question], value="Clear", scale=1, min_width=80)
            with gr.Column(visible=False, elem_id="result") as result_box:
                answer_sql = gr.Code(language="sql", label="SQL: edit it and run it again", lines=3, max_lines=10,
                                     interactive=True, elem_id="answer-sql")
                with gr.Row(equal_height=True):
                    verdict = gr.Markdown(elem_id="verdict")
                    run_button = gr.Button("Run SQL", size="sm", scale=0, min_width=110)
                    download = gr.DownloadButton("Download CSV", size="sm", scale=0, min_width=140)
                with gr.Row(equal_height=True):
                    table = gr.Dataframe(interactive=False, max_height=360, show_label=False, scale=3,
                                         buttons=["copy", "fullscreen"], elem_id="result-table")
                    bar = gr.BarPlot(scale=2, height=340, x_label_angle=-30, elem_id="bar-chart", elem_classes=[PLOT_OFF])
                    line = gr.LinePlot(scale=2, height=340, elem_id="line-chart", elem_classes=[PLOT_OFF])
            with gr.Column(visible=not LIVE_URL):  # the examples bring their own databases, not the live one
                examples = gr.Examples(
                    examples=[[q, db] for _, q, db in EXAMPLES], inputs=[question, schema],
                    example_labels=[f"{label}: {q}" for label, q, _ in EXAMPLES],
                    label="Examples: click one to try it (it loads its database too)", examples_per_page=len(EXAMPLES),
                )
        with gr.Column(scale=2):
            dialect = gr.Dropdown(list(DIALECTS), value=FIRST_DIALECT, label="SQL dialect", elem_id="dialect",
                                  info="Of your schema and of the SQL you get back; the check follows its meaning.")
            upload.render()
            gr.Markdown(UPLOAD_NOTE)
            schema.render()
            schema_status = gr.Markdown(describe_schema(FIRST_SCHEMA, FIRST_DIALECT))
            with gr.Accordion("Generation settings", open=False):
                max_new_tokens = gr.Slider(16, MAX_NEW_TOKENS, value=DEFAULT_NEW_TOKENS, step=16, label="Max new tokens")
                decoding = gr.Radio(["Greedy", "Sample"], value="Greedy", label="Decoding",
                                    info="Greedy gives the model's most likely SQL; sampling varies it.")
                temperature = gr.Slider(0.1, 1.5, value=0.7, step=0.05, label="Temperature", interactive=False)
            with gr.Accordion("About", open=False):
                gr.Markdown(about_markdown())

    pending = gr.State("")  # the question being answered, once the textbox is cleared
    result = [result_box, answer_sql, verdict, table, bar, line, download]
    run = dict(fn=respond, inputs=[pending, chat, schema, dialect, upload, max_new_tokens, decoding, temperature],
               outputs=[chat, *result], show_progress_on=chat, concurrency_id="model", api_visibility="undocumented")

    def unlock() -> tuple:
        return gr.update(interactive=True), gr.update(interactive=True)

    take = dict(fn=take_question, inputs=[question, chat], outputs=[question, pending, ask, chat], queue=False,
                api_visibility="undocumented")
    done = dict(fn=unlock, outputs=[ask, question], queue=False, api_visibility="undocumented")
    question.submit(**take).then(**run).then(**done)
    ask.click(**take).then(**run).then(**done)
    # An example starts a new conversation on its own database: the chat, the result and any upload go.
    examples.load_input_event.then(lambda: ([], None, gr.update(visible=False)), None, [chat, upload, result_box],
                                   queue=False).then(**take).then(**run).then(**done)
    clear.click(lambda: gr.update(visible=False), None, result_box, queue=False, api_visibility="undocumented")
    run_button.click(run_sql, [answer_sql, schema, dialect, upload], result[2:], show_progress_on=verdict,
                     concurrency_id="database", concurrency_limit=1, api_visibility="undocumented")
    stop.click(request_stop, None, None, queue=False, api_visibility="undocumented")
    decoding.change(lambda mode: gr.update(interactive=mode == "Sample"), decoding, temperature, queue=False,
                    api_visibility="undocumented")
    # Opening the database runs user SQL: queued, one at a time, like the answers.
    database = dict(concurrency_id="database", concurrency_limit=1, trigger_mode="always_last",
                    api_visibility="undocumented")
    upload.upload(schema_from_upload, [upload, dialect], schema, show_progress="minimal", **database)
    gr.on([schema.change, dialect.change, upload.change], describe_schema, [schema, dialect, upload], schema_status,
          show_progress="hidden", **database)

    gr.api(sql_api, api_name="sql", concurrency_id="model")
    gr.api(check_api, api_name="check", concurrency_id="database")
    gr.api(chat_api, api_name="chat", concurrency_id="model")
    gr.api(usage_api, api_name="usage", queue=False)

demo.queue(default_concurrency_limit=BACKEND.concurrency, max_size=QUEUE_SIZE)

if __name__ == "__main__":
    # The served process caps SQLite's memory (process-wide; `import app` in tests leaves it alone).
    limit_heap(SQLITE_HARD_HEAP_BYTES, SQLITE_SOFT_HEAP_BYTES)
    freeze_long_lived_objects()  # the model, Gradio and the page: collections then walk what answers make
    # No server_name/server_port here: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT decide (Spaces sets them).
    demo.launch(theme=gr.themes.Soft(primary_hue="indigo"), css=CSS, max_file_size=MAX_UPLOAD_BYTES)
