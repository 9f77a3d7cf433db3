"""StarSQL: ask a question about your database in plain English, get SQLite SQL back, checked.

    python app.py                                                  # bigcode/starcoder2-3b + $ADAPTER
    python app.py --base_model tiny-starcoder2 --adapter runs/tiny   # offline smoke run on a CPU
    BASE_MODEL=bigcode/starcoder2-3b ADAPTER=USER/starcoder2-3b-sql python app.py

The same file is the Hugging Face Space (`python -m starsql.serve.deploy`). The model is loaded once, at
import: ZeroGPU wants it on CUDA at start-up and lends the GPU only while `generate` runs.
Every answer is compiled against the schema in a throwaway in-memory SQLite database
(starsql/serve/check.py), never run against anything else.

API (gradio_client): /sql(question, schema) -> {sql, valid, error, unknown_identifiers, rows, ...}
and /chat(message, schema, history, max_new_tokens, temperature), which streams the reply.
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
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

import gradio as gr
import torch

from starsql.prompt import build_prompt, extract_sql, fit_history
from starsql.sandbox import Budget, limit_heap
from starsql.schema import split_statements
from starsql.serve.check import (
    TIME_LIMIT_S,
    CheckResult,
    SchemaError,
    check_sql,
    format_sql,
    looks_like_sql,
    open_database,
    statement_kind,
    text_problem,
)
from starsql.serve.decode import BackendError, build_backend, statement_finished
from starsql.serve.load import load_for_inference, load_tokenizer

DEFAULT_BASE = "bigcode/starcoder2-3b"
MAX_QUESTION_CHARS = 1_000
MAX_SCHEMA_CHARS = 20_000
DEFAULT_NEW_TOKENS = 256
MAX_NEW_TOKENS = 512
MAX_TEMPERATURE = 2.0
MAX_HISTORY_TOKENS = 1_024  # earlier turns in the prompt; older ones are dropped first, and the user told
# SQLite's memory in the app's process, all sandboxes together (at most QUEUE concurrency + 1 at once).
SQLITE_HARD_HEAP_BYTES = 128 * 2**20
SQLITE_SOFT_HEAP_BYTES = 48 * 2**20
SHOWN_ROWS = 10  # rows of a result shown in the chat; the /sql API returns up to starsql.serve.check.MAX_ROWS
QUEUE_SIZE = 100  # waiting requests before new ones are turned away
WRITING = "_Writing SQL…_"  # ends a reply while the model writes
STOPPED = "_Stopped._"  # ends a reply cut short by the Stop button
STOP_POLL_S = 0.05  # how often a waiting answer looks at its Stop event
CHAT_UPDATE_S = 0.1  # the chat redraws a growing answer at most this often (the browser keeps up, Stop stays quick)
GPU_SECONDS = 60  # ZeroGPU lease per answer: 512 tokens of a 3B model fit easily


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
    return parser.parse_args(argv)


# Flags only when run as a script; `import app` (tests, Spaces' reloader) reads the env vars alone.
ARGS = parse_args(None if __name__ == "__main__" else [])
ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")
# FAST_DECODE=0: plain generate() on a dedicated GPU too (no CUDA graphs, no Triton kernel).
FAST_DECODE = os.environ.get("FAST_DECODE", "1").lower() not in ("0", "false", "no")
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
    # The fast backend needs a GPU of its own (ZeroGPU lends one per call) and bf16 weights (not a 4-bit base).
    DEDICATED_GPU = torch.cuda.is_available() and not ZERO_GPU and not ARGS.load_in_4bit
    BACKEND = build_backend(MODEL, TOKENIZER, fast=FAST_DECODE and DEDICATED_GPU)


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
# The work: plain functions the UI and the API call.

def schema_for_prompt(schema: str) -> str:
    """The CREATE statements only: the model was trained on schemas without rows."""
    return "\n".join(s for s in split_statements(schema) if s.lstrip().upper().startswith("CREATE"))


def input_problem(question, schema) -> str | None:
    """What is wrong with the question or the schema, in words, or None if they are fine to load."""
    if isinstance(question, str) and not question.strip():
        return "Please type a question about the database."
    problem = text_problem(question, "question")
    if problem:
        return problem
    if len(question) > MAX_QUESTION_CHARS:
        return f"The question is {len(question):,} characters long; at most {MAX_QUESTION_CHARS:,} are allowed."
    if isinstance(schema, str) and not schema.strip():
        return "Please put the database schema (CREATE TABLE statements) in the schema box."
    problem = text_problem(schema, "schema")
    if problem:
        return problem
    if len(schema) > MAX_SCHEMA_CHARS:
        return f"The schema is {len(schema):,} characters long; at most {MAX_SCHEMA_CHARS:,} are allowed."
    return None


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


def pieces_until_stopped(stream: Iterator[str], stopped) -> Iterator[str]:
    """The stream's pieces until it ends or `stopped()`. The stream is read in a thread of its own,
    so Stop is seen within STOP_POLL_S even while the model is still on a piece (a streamer yields
    whole words); that thread closes the stream, which ends the generation, at its next piece."""
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
            getattr(stream, "close", lambda: None)()
            pieces.put(end)

    threading.Thread(target=pump, daemon=True, name="starsql-stream").start()
    try:
        while not stopped():
            try:
                item = pieces.get(timeout=STOP_POLL_S)
            except queue.Empty:
                continue
            if item is end:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        gone.set()


def answer(question: str, schema: str, history: list[tuple[str, str]] | None = None,
           max_new_tokens: int = DEFAULT_NEW_TOKENS, temperature: float = 0.0,
           stop: threading.Event | None = None) -> Iterator[tuple[str, CheckResult | None]]:
    """Stream (SQL so far, None) while the model writes, then (final SQL, its check).

    Bad input or output ends in a CheckResult whose `error` says what went wrong. The schema is
    loaded once, before the model writes; loading, listing and checking share TIME_LIMIT_S. Setting
    `stop` ends the answer within a token (or a SQLite progress step), with `stopped` set."""
    problem = (input_problem(question, schema) or history_problem(history or [])
               or settings_problem(max_new_tokens, temperature))
    if problem:
        yield "", CheckResult(sql="", error=problem)
        return
    stopped = stop.is_set if stop is not None else (lambda: False)
    try:
        database = open_database(schema, Budget(TIME_LIMIT_S, cancelled=stopped))
    except SchemaError as error:
        yield "", CheckResult(sql="", error=f"The schema does not load. {error}", stopped=stopped())
        return
    try:
        if not database.tables:
            yield "", CheckResult(sql="", error="The schema has no tables: add CREATE TABLE statements.")
            return
        history, dropped = fit_history(history, count_tokens, MAX_HISTORY_TOKENS)
        prompt = build_prompt(schema_for_prompt(schema), question, history)
        text = ""
        try:
            for piece in pieces_until_stopped(generate(prompt, int(max_new_tokens), float(temperature)), stopped):
                if stopped():
                    break  # what was shown last stays the answer
                text = piece
                yield extract_sql(text), None
        except BackendError as error:  # an endpoint down, slow or refusing: say so, keep what was written
            yield extract_sql(text), CheckResult(sql=extract_sql(text), error=str(error), dropped_turns=dropped)
            return
        raw = extract_sql(text)
        if stopped():
            yield raw, CheckResult(sql=raw, error="Stopped.", stopped=True, dropped_turns=dropped)
            return
        cut = not statement_finished(text) and count_tokens(text) >= max_new_tokens
        problem = text_problem(raw, "model's answer")
        if problem or not looks_like_sql(raw):
            error = (f"{problem} Ask again." if problem else
                     "The model did not produce SQL. Try rephrasing the question, or name the tables and columns you mean.")
            shown = raw.replace("\x00", "\\x00") if problem and "\x00" in raw else ("" if problem else raw)
            yield shown, CheckResult(sql=shown, error=error, cut=cut, dropped_turns=dropped)
            return
        pretty = format_sql(raw)
        check = check_sql(pretty, database)
        if not check.valid and pretty != raw and not check.stopped:  # sqlglot's rewrite must never be what breaks it
            check = check_sql(raw, database)
        check.cut, check.dropped_turns = cut, dropped
        yield check.sql, check
    finally:
        database.close()


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
        kind = statement_kind(check.sql) or "this statement"
        parts.append(f"⚠ **Changes the database ({kind}).** Valid for this schema, but not run. "
                     "Review it before running it on a real database.")
    elif not check.valid:
        parts.append(f"✗ **Not valid for this schema:** {check.error}")
    else:
        parts.append("✓ **Valid for this schema.**")
    if check.unknown_identifiers:
        names = ", ".join(f"`{name}`" for name in check.unknown_identifiers)
        parts.append(f"Not in the schema: {names}")
    if check.valid and not check.writes_data:
        if check.error:  # ran into the time limit
            parts.append(check.error)
        elif check.rows is not None:
            count = f"{len(check.rows)}{'+' if check.truncated else ''} row{'s' if len(check.rows) != 1 else ''}"
            parts.append(f"Result on the example rows ({count}):\n\n" + markdown_table(check.columns, check.rows))
            if len(check.rows) > SHOWN_ROWS:
                parts.append(f"_…first {SHOWN_ROWS} shown._")
    return "\n\n".join(parts + notes_markdown(check))


def sql_api(question: str, schema: str = CONCERT_DB) -> dict:
    """SQL for `question` on `schema`, greedy, checked: {sql, valid, error, unknown_identifiers,
    rows, columns, writes_data, truncated, cut, ...}. `rows` holds the result on the schema's INSERT
    rows; `cut` is true when the model stopped at its token limit before the statement's end."""
    *_, (_, check) = answer(question, schema)  # the last item holds the check
    return check.to_dict()


def chat_api(message: str, schema: str = CONCERT_DB, history: list[list[str]] | None = None,
             max_new_tokens: int = DEFAULT_NEW_TOKENS, temperature: float = 0.0) -> Iterator[str]:
    """Stream the reply (markdown: SQL, verdict, result). `history` holds earlier [question, sql]
    pairs; the latest that fit MAX_HISTORY_TOKENS go into the prompt, and the reply says if any did not."""
    history = [] if history is None else history
    problem = history_problem(history)
    if problem:
        yield f"⚠ {problem}"
        return
    for sql, check in answer(message, schema, [(q, s) for q, s in history], max_new_tokens, temperature):
        yield reply_markdown(sql, check)


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


def respond(question: str, messages: list[dict], schema: str, max_new_tokens: int, decoding: str,
            temperature: float, request: gr.Request = None) -> Iterator[list[dict]]:
    """The chat: append the question, stream the answer into the last message."""
    messages = list(messages or [])
    if not isinstance(question, str) or not question.strip():  # nothing to answer: a notice, the chat unchanged
        gr.Warning(input_problem(question, schema))
        yield messages
        return
    with _STOP_LOCK:
        stop = _STOP_EVENTS.get(_session(request)) if request is not None else None
    temperature = temperature if decoding == "Sample" else 0.0
    history = history_pairs(messages)
    messages.append({"role": "user", "content": question})
    shown = 0.0
    for sql, check in answer(question, schema, history, max_new_tokens, temperature, stop):
        if check is None and time.monotonic() - shown < CHAT_UPDATE_S:
            continue  # a newer piece comes soon; the final reply always goes out
        shown = time.monotonic()
        yield messages + [{"role": "assistant", "content": reply_markdown(sql, check)}]


def describe_schema(schema: str) -> str:
    """One line under the schema box: what loaded, or which statement failed."""
    if isinstance(schema, str) and len(schema) > MAX_SCHEMA_CHARS:
        return f"⚠ {len(schema):,} characters; at most {MAX_SCHEMA_CHARS:,} are allowed."
    problem = text_problem(schema, "schema")
    if problem:
        return f"⚠ {problem}"
    try:
        database = open_database(schema)
    except SchemaError as error:
        return f"⚠ {error}"
    database.close()
    if not database.tables:
        return "⚠ No tables yet: add CREATE TABLE statements."
    names = ", ".join(f"`{name}`" for name in database.tables)
    data = (f"{database.rows} example rows: valid queries are run on them" if database.rows
            else "no rows: add INSERTs to see results")
    return f"✓ {len(database.tables)} table{'s' if len(database.tables) != 1 else ''} ({names}); {data}."


def about_markdown() -> str:
    def link(name: str) -> str:
        on_hub = "/" in name and not os.path.exists(name)
        return f"[{name}](https://huggingface.co/{name})" if on_hub else f"`{name}`"

    model = f"{link(ARGS.adapter)} (LoRA on {link(ARGS.base_model)})" if ARGS.adapter else link(ARGS.base_model)
    return f"""\
**Model:** {model}. It reads the CREATE TABLE statements and your question, and writes one SQLite statement.

**Check:** the SQL is compiled against your schema in a throwaway in-memory SQLite database. If the schema
box holds INSERT rows, a valid read-only query is run on them for 2 s at most, and the first {SHOWN_ROWS}
result rows are shown. Statements that would change data are flagged and never run. Nothing touches any
other database.

**Limitations:** the model can be wrong, even when the SQL is valid: review the SQL before running it on
real data. It knows only the schema you give it (no data, no other tables) and writes SQLite SQL.
Questions up to {MAX_QUESTION_CHARS:,} characters, schemas up to {MAX_SCHEMA_CHARS:,}.

**API:** `Client(url).predict(question, schema, api_name="/sql")` returns JSON;
`/chat` streams the reply (see "Use via API" at the bottom of the page)."""


# ---------------------------------------------------------------------------------------------
# The UI, declared in one place.

CSS = """
#chat table th, #chat table td { padding: 4px 12px !important; font-size: 0.92em; }
"""

with gr.Blocks(title="StarSQL: English to SQL") as demo:
    gr.Markdown("# ★ StarSQL · ask your database in English\n"
                "Describe your tables on the right, ask a question, get SQLite SQL checked against the schema. "
                "Follow-up questions build on the conversation.")
    # Rendered in the right column below; created first so the examples under the chat can fill it.
    schema = gr.Code(CONCERT_DB, language="sql", label="Database schema",
                     lines=12, max_lines=20, interactive=True, wrap_lines=True, render=False)
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
            examples = gr.Examples(
                examples=[[q, db] for _, q, db in EXAMPLES], inputs=[question, schema],
                example_labels=[f"{label}: {q}" for label, q, _ in EXAMPLES],
                label="Examples: click one to try it (it loads its database too)", examples_per_page=len(EXAMPLES),
            )
        with gr.Column(scale=2):
            schema.render()
            schema_status = gr.Markdown(describe_schema(CONCERT_DB))
            with gr.Accordion("Generation settings", open=False):
                max_new_tokens = gr.Slider(16, MAX_NEW_TOKENS, value=DEFAULT_NEW_TOKENS, step=16, label="Max new tokens")
                decoding = gr.Radio(["Greedy", "Sample"], value="Greedy", label="Decoding",
                                    info="Greedy gives the model's most likely SQL; sampling varies it.")
                temperature = gr.Slider(0.1, 1.5, value=0.7, step=0.05, label="Temperature", interactive=False)
            with gr.Accordion("About", open=False):
                gr.Markdown(about_markdown())

    pending = gr.State("")  # the question being answered, once the textbox is cleared
    run = dict(fn=respond, inputs=[pending, chat, schema, max_new_tokens, decoding, temperature], outputs=chat,
               concurrency_id="model", api_visibility="undocumented")

    def take_question(text: str, request: gr.Request) -> tuple:
        """Move the question out of the box and lock Ask and the box until the answer is written."""
        start_turn(request)
        return gr.update(value="", interactive=False), text, gr.update(interactive=False)

    def unlock() -> tuple:
        return gr.update(interactive=True), gr.update(interactive=True)

    take = dict(fn=take_question, inputs=question, outputs=[question, pending, ask], queue=False,
                api_visibility="undocumented")
    done = dict(fn=unlock, outputs=[ask, question], queue=False, api_visibility="undocumented")
    question.submit(**take).then(**run).then(**done)
    ask.click(**take).then(**run).then(**done)
    # An example starts a new conversation: its database may not be the one the chat was about.
    examples.load_input_event.then(lambda: [], None, chat, queue=False).then(**take).then(**run).then(**done)
    stop.click(request_stop, None, None, queue=False, api_visibility="undocumented")
    decoding.change(lambda mode: gr.update(interactive=mode == "Sample"), decoding, temperature, queue=False,
                    api_visibility="undocumented")
    # Loading a schema runs user SQL: queued, one at a time, like the answers.
    schema.change(describe_schema, schema, schema_status, show_progress="hidden", concurrency_id="schema",
                  concurrency_limit=1, trigger_mode="always_last", api_visibility="undocumented")

    gr.api(sql_api, api_name="sql", concurrency_id="model")
    gr.api(chat_api, api_name="chat", concurrency_id="model")

demo.queue(default_concurrency_limit=BACKEND.concurrency, max_size=QUEUE_SIZE)

if __name__ == "__main__":
    # The served process caps SQLite's memory (process-wide; `import app` in tests leaves it alone).
    limit_heap(SQLITE_HARD_HEAP_BYTES, SQLITE_SOFT_HEAP_BYTES)
    # No server_name/server_port here: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT decide (Spaces sets them).
    demo.launch(theme=gr.themes.Soft(primary_hue="indigo"), css=CSS)
