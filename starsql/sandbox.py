"""The read-only SQLite sandbox that generated SQL runs in: the app's schema check and the
evaluation harness share one definition of "only reads" and one time limit.

`open_limited` adds the app's bounds on an in-memory database (or an uploaded file, read-only)
that holds untrusted SQL: SQLite's own limits (value length, SQL length, expression depth,
columns, ...), a cap on the database's size, and a `printf`/`format` whose width and precision are
capped (SQLite's builtin spends seconds on `printf('%.*c', 2147483647, 'x')` without ever reaching
the progress handler). `limit_heap` caps all of SQLite's memory in the process, for a server that
runs several sandboxes at once.
"""

import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}

MAX_VALUE_BYTES = 100_000  # longest string or blob a statement may build (SQLITE_LIMIT_LENGTH)
MAX_DB_BYTES = 16 * 2**20  # the in-memory database's pages, rows included (max_page_count)
PAGE_BYTES = 4096
# SQLite's run-time limits for untrusted SQL: generous for real schemas and queries, small enough
# that no single statement builds gigabytes or recurses for seconds inside one step of the VM.
LIMITS = {
    sqlite3.SQLITE_LIMIT_LENGTH: MAX_VALUE_BYTES,
    sqlite3.SQLITE_LIMIT_SQL_LENGTH: 100_000,
    sqlite3.SQLITE_LIMIT_COLUMN: 200,
    sqlite3.SQLITE_LIMIT_EXPR_DEPTH: 100,
    sqlite3.SQLITE_LIMIT_COMPOUND_SELECT: 50,
    sqlite3.SQLITE_LIMIT_FUNCTION_ARG: 32,
    sqlite3.SQLITE_LIMIT_ATTACHED: 0,
    sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH: 1_000,
    sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER: 100,
    sqlite3.SQLITE_LIMIT_TRIGGER_DEPTH: 10,
    sqlite3.SQLITE_LIMIT_WORKER_THREADS: 0,
}


def is_read(action: int, arg1) -> bool:
    # Table-valued functions (json_each, pragma_table_info) register themselves with an internal
    # UPDATE of sqlite_master when first used; user SQL cannot write sqlite_master.
    return action in READ_ACTIONS or (action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master")


def read_only_authorizer(action, arg1, arg2, db_name, trigger) -> int:
    """For `Connection.set_authorizer`: reads pass, everything else (writes, PRAGMA, ATTACH) is refused."""
    return sqlite3.SQLITE_OK if is_read(action, arg1) else sqlite3.SQLITE_DENY


@contextmanager
def authorizer(conn: sqlite3.Connection, callback):
    conn.set_authorizer(callback)
    try:
        yield
    finally:
        conn.set_authorizer(None)


class Budget:
    """Seconds that several steps share (load a schema, list it, compile, run): each `time_limit`
    spends what it uses. `cancelled` (e.g. a Stop button's event) ends the budget early."""

    def __init__(self, seconds: float, cancelled=None):
        self.seconds, self.left, self.cancelled = seconds, seconds, cancelled or (lambda: False)

    def stopped(self) -> bool:
        return bool(self.cancelled())


@contextmanager
def time_limit(conn: sqlite3.Connection, seconds: "float | Budget", steps: int = 1000):
    """Abort whatever `conn` runs once `seconds` have passed (or a Budget is spent or cancelled):
    SQLite raises 'interrupted'. A progress handler really stops the VM, unlike a timer around the
    Python call."""
    budget = seconds if isinstance(seconds, Budget) else Budget(seconds)
    start = time.monotonic()
    deadline = start + budget.left
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline or budget.stopped()), steps)
    try:
        yield
    finally:
        conn.set_progress_handler(None, 0)
        budget.left = max(0.0, budget.left - (time.monotonic() - start))


# printf-style specifications: flags, width, precision, size, conversion (SQLite's printf.c).
_SPEC = re.compile(r"%([-+ 0#,!]*)(\*|\d+)?(?:\.(\*|\d+))?(l{0,2})([a-zA-Z%])")
_printf_conn = sqlite3.connect(":memory:", check_same_thread=False)
_printf_conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
_printf_lock = threading.Lock()


def _int(value) -> int:
    try:
        return abs(int(value))
    except (TypeError, ValueError, OverflowError):
        return 0


def _capped_printf(name: str):
    """SQLite's printf (or format), after checking that no width or precision asks for more than
    MAX_VALUE_BYTES characters; such a call returns NULL at once, as SQLite's own does, late."""
    call = f"SELECT {name}(" + "{}" + ")"

    def printf(*args):
        if not args or not isinstance(args[0], str):
            return None if not args or args[0] is None else str(args[0])
        position = 1
        for match in _SPEC.finditer(args[0]):
            if match.group(5) == "%":
                continue
            for size in (match.group(2), match.group(3)):
                if size == "*":
                    size, position = (args[position] if position < len(args) else 0), position + 1
                if size is not None and _int(size) > MAX_VALUE_BYTES:
                    return None
            position += 1
        with _printf_lock:
            return _printf_conn.execute(call.format(", ".join("?" * len(args))), args).fetchone()[0]

    return printf


def read_only_uri(path: "str | Path") -> str:
    """The URI that opens a SQLite file read-only and immutable (for sqlite3.connect(..., uri=True))."""
    return f"file:{quote(str(Path(path).resolve()))}?mode=ro&immutable=1"


def open_limited(max_db_bytes: int = MAX_DB_BYTES, path: "str | Path | None" = None) -> sqlite3.Connection:
    """A fresh in-memory database with LIMITS, at most `max_db_bytes` of pages, temporary
    structures in memory (under the heap limit, not on disk) and a capped printf/format.

    With `path`, that SQLite file instead, opened read-only (`mode=ro`) and immutable: SQLite then
    neither locks it nor looks for a journal or WAL file beside it, so nothing is ever written next to
    it. Only for a file nobody changes while it is open (an upload's own copy); `PRAGMA query_only`
    refuses writes once more."""
    if path is None:
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only = ON")
    for limit, value in LIMITS.items():
        conn.setlimit(limit, value)
    conn.execute(f"PRAGMA page_size = {PAGE_BYTES}")  # no effect on an existing file
    conn.execute("PRAGMA temp_store = MEMORY")
    for schema in ("main", "temp"):  # CREATE TEMP TABLE fills the temp database
        conn.execute(f"PRAGMA {schema}.max_page_count = {max(1, max_db_bytes // PAGE_BYTES)}")
    for name in ("printf", "format"):
        conn.create_function(name, -1, _capped_printf(name), deterministic=True)
    return conn


def limit_heap(hard_bytes: int, soft_bytes: int) -> None:
    """Cap SQLite's memory in this process (PRAGMA hard_heap_limit / soft_heap_limit): a statement
    that needs more fails with 'out of memory' (MemoryError) instead of growing the process. The
    limit is process-wide, so it bounds all sandboxes that run at once together; a server keeps their
    number small (its queue's concurrency) so that each gets a useful share."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(f"PRAGMA hard_heap_limit = {int(hard_bytes)}")
        conn.execute(f"PRAGMA soft_heap_limit = {int(soft_bytes)}")
    finally:
        conn.close()
