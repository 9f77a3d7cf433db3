"""The DuckDB sandbox: SQL of the PostgreSQL-like dialects checked and run with the same guarantees
as the SQLite one (starsql/sandbox.py, starsql/serve/check.py).

A connection is in-memory (a dump loaded into it) or a database file attached read-only. It gets a
memory limit, one thread, no temporary directory (nothing spills to disk), then no access to files,
extensions or settings (`enable_external_access = false`, `lock_configuration = true`): whatever the
SQL says, it reads only what was loaded. DuckDB's own parser says what a statement is
(`extract_statements`): only a SELECT is run, inside a transaction that is rolled back, under the
shared time Budget (a watchdog calls `conn.interrupt()`) and caps on rows and bytes. Anything else is
compiled with EXPLAIN, never executed, or refused outright when it would touch files or settings.

What DuckDB itself does not bound (one function call that builds gigabytes of string, outside
memory_limit and deaf to interrupt()) the process does: a workspace's database, a live DuckDB
file's queries (live.DuckFile), and an uploaded DuckDB file's copy into SQLite (files.py) live in a worker process (`open_isolated`, run as
`python -m starsql.db.duck`) whose address space is capped and which is killed once the budget and
a short grace are spent, or Stop is pressed.
"""

import gc
import os
import re
import subprocess
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import duckdb
import pyarrow as pa

from ..sandbox import Budget
from ..schema import Column, ForeignKey, Table
from ..serve.check import CheckResult, SchemaError, fetch_capped, several_statements, verdict
from .live import sqlite_type

MAX_MEMORY_BYTES = 256 * 2**20  # one connection's memory (DuckDB's buffer manager): data and query together
THREADS = 1
WATCH_S = 0.02  # how often the watchdog looks at the deadline and the Stop button

# Statements that run: queries only (SHOW, DESCRIBE, SUMMARIZE and FROM-first queries are SELECTs too).
READ = duckdb.StatementType.SELECT
# Statements refused without being compiled: they reach files, extensions, settings or prepared state.
REFUSED = {getattr(duckdb.StatementType, name) for name in (
    "ATTACH", "DETACH", "PRAGMA", "SET", "VARIABLE_SET", "LOAD", "EXTENSION", "COPY", "COPY_DATABASE", "EXPORT",
    "CALL", "PREPARE", "EXECUTE", "EXPLAIN", "LOGICAL_PLAN", "RELATION", "INVALID")}
# Type names DuckDB reads narrower than the dumps' databases do: 32-bit INTEGER and REAL/FLOAT, and
# NUMERIC/DECIMAL without a precision, which DuckDB rounds to 3 decimals (PostgreSQL keeps them all).
WIDENED = {"INT": "BIGINT", "INTEGER": "BIGINT", "MEDIUMINT": "BIGINT", "REAL": "DOUBLE", "FLOAT": "DOUBLE",
           "NUMERIC": "DOUBLE", "DECIMAL": "DOUBLE"}
# A type name as a dump spells it (after the DUMPS normalisation): a word or two and optional (p[, s]).
_TYPE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*( [A-Za-z][A-Za-z0-9_]*)*\s*(\(\s*\d+\s*(,\s*\d+\s*)?\))?")


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def open_duck(path: "str | Path | None" = None, settings: tuple[str, ...] = ()) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB with the memory limit, one thread, no spilling to disk and no
    extension autoloading; with `path`, the DuckDB file there attached read-only as its current
    database. Each call is a database instance of its own (DuckDB shares one instance between
    connections to the same file, and with it their settings and lock). `settings` (a dialect's
    ENGINE_SETTINGS) run before `lock` freezes them; loading data in between is the caller's."""
    config = {"memory_limit": f"{MAX_MEMORY_BYTES // 2**20}MB", "threads": THREADS, "temp_directory": "",
              "autoload_known_extensions": False, "autoinstall_known_extensions": False}
    conn = duckdb.connect(":memory:", config=config)
    try:
        if path is not None:
            conn.execute(f"ATTACH '{str(path).replace(chr(39), chr(39) * 2)}' AS upload (READ_ONLY)")
            conn.execute("USE upload")
        for statement in settings:
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


def lock(conn: duckdb.DuckDBPyConnection) -> None:
    """No files, extensions or settings from now on: what user SQL meets."""
    conn.execute("SET enable_external_access = false")
    conn.execute("SET lock_configuration = true")


@contextmanager
def time_limit(conn: duckdb.DuckDBPyConnection, budget: Budget):
    """Interrupt whatever `conn` runs once the budget is spent or cancelled (DuckDB raises
    InterruptException); the time used is taken from the budget."""
    start = time.monotonic()
    deadline, done = start + budget.left, threading.Event()

    def watch():
        while not done.wait(WATCH_S):
            if time.monotonic() > deadline or budget.stopped():
                conn.interrupt()
                return

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        done.set()
        watchdog.join()
        budget.left = max(0.0, budget.left - (time.monotonic() - start))


def message(error: BaseException, budget: Budget) -> str:
    """DuckDB's error in words a user can act on: its first paragraph, without the error class noise."""
    if isinstance(error, duckdb.InterruptException):
        return "stopped" if budget.stopped() else f"stopped after {budget.seconds:g} s (time limit)"
    if isinstance(error, (duckdb.OutOfMemoryException, MemoryError)):
        return (f"ran out of memory (the sandbox's {MAX_MEMORY_BYTES // 2**20} MB); "
                "make the data or the query smaller")
    if isinstance(error, duckdb.PermissionException):
        return "Not allowed here: files, extensions and settings are off limits; nothing was run."
    return " ".join(str(error).split("\n\n")[0].split())


# ---------------------------------------------------------------------------------------------
# Loading tables and reading them back


def engine_type(conn: duckdb.DuckDBPyConnection, type_name: str) -> str:
    """The DuckDB type for a dump's column type: a name DuckDB knows as is, but for WIDENED; anything
    else VARCHAR."""
    name = (type_name or "").strip().upper()
    if name in WIDENED:
        return WIDENED[name]
    if not _TYPE_NAME.fullmatch(name):
        return "VARCHAR"
    try:
        conn.execute(f"SELECT CAST(NULL AS {name})")
        return name
    except duckdb.Error:
        return "VARCHAR"


def _arrow_column(values: list) -> pa.Array:
    """One column's values as Arrow; mixed types (text in a number column) as text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if v is None else v.decode(errors="replace") if isinstance(v, bytes) else str(v)
                         for v in values], pa.string())


def insert_rows(conn: duckdb.DuckDBPyConnection, table: str, columns: list[str], rows: list[tuple]) -> None:
    """Append `rows` (tuples in column order) to `table`; DuckDB casts each value to its column's type."""
    data = pa.table({f"c{i}": _arrow_column([row[i] if i < len(row) else None for row in rows])
                     for i in range(len(columns))})
    conn.register("starsql_rows", data)
    try:
        conn.execute(f"INSERT INTO {quote(table)} ({', '.join(map(quote, columns))}) SELECT * FROM starsql_rows")
    finally:
        conn.unregister("starsql_rows")


def load_tables(conn: duckdb.DuckDBPyConnection, tables: list[Table], rows: dict[str, list[tuple]],
                budget: Budget) -> None:
    """Create `tables` (views too, as tables of their columns) and insert their rows, under the
    budget. Raises SchemaError naming the table that does not load."""
    with time_limit(conn, budget):
        for table in tables:
            try:
                columns = ", ".join(f"{quote(c.name)} {engine_type(conn, c.type)}" for c in table.columns)
                conn.execute(f"CREATE TABLE {quote(table.name)} ({columns})")
                if rows.get(table.name):
                    insert_rows(conn, table.name, table.column_names(), rows[table.name])
            except (duckdb.Error, MemoryError) as error:
                raise SchemaError(0, "", f"table `{table.name}` does not load into DuckDB: {message(error, budget)}") from None


def duck_tables(conn: duckdb.DuckDBPyConnection) -> list[Table]:
    """The tables and views of the main schema of `conn`'s database, with primary and foreign keys and
    the SQLite-style type names every schema shows the model."""
    tables: dict[str, Table] = {}
    for name, kind in conn.execute(
            "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'main' "
            "AND table_catalog = current_database() ORDER BY table_type, table_name").fetchall():
        tables[name] = Table(name, [], view=kind == "VIEW")
    for name, column, column_type in conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'main' "
            "AND table_catalog = current_database() ORDER BY table_name, ordinal_position").fetchall():
        if name in tables:
            tables[name].columns.append(Column(column, sqlite_type(column_type, "duckdb")))
    for name, kind, columns, ref_table, ref_columns in conn.execute(
            "SELECT table_name, constraint_type, constraint_column_names, referenced_table, referenced_column_names "
            "FROM duckdb_constraints() WHERE schema_name = 'main' AND database_name = current_database() "
            "AND constraint_type IN ('PRIMARY KEY', 'FOREIGN KEY')").fetchall():
        if name not in tables:
            continue
        if kind == "PRIMARY KEY":
            tables[name].primary_key = list(columns)
        else:
            tables[name].foreign_keys.append(ForeignKey(list(columns), ref_table, list(ref_columns) or list(columns)))
    return list(tables.values())


def row_count(conn: duckdb.DuckDBPyConnection, tables: list[Table], budget: Budget) -> int:
    """Rows in all base tables together, under the budget."""
    with time_limit(conn, budget):
        try:
            return sum(conn.execute(f"SELECT count(*) FROM {quote(t.name)}").fetchone()[0] for t in tables if not t.view)
        except (duckdb.Error, MemoryError) as error:
            raise SchemaError(0, "", message(error, budget)) from None


# ---------------------------------------------------------------------------------------------
# Checking and running SQL


@dataclass
class DuckDatabase:
    """A DuckDB connection ready for one request's checks: its tables' columns (for unknown
    identifiers), its row count and the budget every step spends. Close it when the request ends."""
    conn: duckdb.DuckDBPyConnection
    tables: dict[str, list[str]]
    rows: int
    budget: Budget

    def close(self) -> None:
        self.conn.close()


def open_database(tables: list[Table], budget: Budget, path: "str | Path | None" = None,
                  rows: dict[str, list[tuple]] | None = None, settings: tuple[str, ...] = ()) -> DuckDatabase:
    """`tables` with their `rows` loaded into a fresh in-memory DuckDB, or the DuckDB file at `path`
    (read-only; `tables` then describes it), locked for user SQL. Raises SchemaError."""
    conn = open_duck(path, settings)
    try:
        if path is None:
            load_tables(conn, tables, rows or {}, budget)
            count = sum(len(rows.get(t.name, ())) for t in tables) if rows else 0
        else:
            count = row_count(conn, tables, budget)
        lock(conn)
        return DuckDatabase(conn, {t.name: t.column_names() for t in tables}, count, budget)
    except BaseException:
        conn.close()
        raise


def classify(conn: duckdb.DuckDBPyConnection, sql: str, budget: Budget) -> tuple[str | None, bool, bool]:
    """(error or None, writes: it is no query, query: it returns rows and only reads), as DuckDB's
    parser and planner see `sql` (one statement). A non-query is compiled with EXPLAIN, never run."""
    try:
        (statement,) = conn.extract_statements(sql)
    except duckdb.Error as error:
        return message(error, budget), False, False
    if statement.type in REFUSED:
        return (f"Not allowed here: {statement.type.name} (only queries run; files, extensions and settings "
                "are off limits); nothing was run."), True, False
    try:
        with time_limit(conn, budget):
            conn.execute("EXPLAIN " + sql).fetchall()
    except (duckdb.Error, MemoryError) as error:
        if statement.type != READ and "read-only mode" in str(error):
            return None, True, False  # a file opened read-only refuses to plan a write at all: it writes
        return message(error, budget), statement.type != READ, False
    return None, statement.type != READ, statement.type == READ


def run(conn: duckdb.DuckDBPyConnection, sql: str, budget: Budget, max_rows: int) -> tuple[list[str], list[list], bool]:
    """A query's first `max_rows` rows (and MAX_RESULT_BYTES), in a transaction that is rolled back."""
    conn.execute("BEGIN TRANSACTION")
    try:
        with time_limit(conn, budget):
            return fetch_capped(conn.execute(sql), max_rows)
    finally:
        conn.execute("ROLLBACK")


def check(result: CheckResult, engine_sql: str, database: DuckDatabase, max_rows: int) -> CheckResult:
    """Fill in `result` (started by check.new_result on the user's SQL) for `engine_sql`, that SQL as
    DuckDB runs it: valid, writes, and the rows when it is a query and there are rows to run it on."""
    conn, budget = database.conn, database.budget
    try:
        statements = conn.extract_statements(engine_sql)
    except duckdb.Error as error:
        result.error = message(error, budget)
        return result
    if not statements:  # only comments (or semicolons): nothing DuckDB would run
        result.error = "No SQL to check."
        return result
    if len(statements) > 1:
        return several_statements(result, len(statements), any(s.type != READ for s in statements))
    if not verdict(result, *classify(conn, engine_sql, budget), budget):
        return result
    if database.rows == 0:
        return result  # no rows to run it on: compiled only, as on SQLite
    try:
        result.columns, result.rows, result.truncated = run(conn, engine_sql, budget, max_rows)
    except (duckdb.Error, MemoryError) as error:
        result.stopped = budget.stopped()
        if isinstance(error, duckdb.InterruptException) and not result.stopped:
            result.error = f"Stopped after {budget.seconds:g} s: the query ran too long on the rows."
        else:
            result.error = message(error, budget)
    return result


# ---------------------------------------------------------------------------------------------
# A process per database: the hard limits
#
# DuckDB's memory_limit governs its buffer manager, not every allocation: one call of replace() or
# repeat() can build gigabytes of string, outside the limit and deaf to interrupt() until it ends.
# So a workspace's DuckDB lives in a Python process of its own, whose address space is capped
# (RLIMIT_AS) and which is killed when the budget and a short grace are spent or Stop is pressed.

MAX_PROCESS_BYTES = 1 * 2**30  # the worker's address space beyond what Python and DuckDB take to start
GRACE_S = 0.5  # how long interrupt() gets after the budget before the worker is killed
START_LIMIT_S = 60.0  # a worker's start (loading Python modules and DuckDB) on a busy machine
SPARE_WORKERS = 1  # started ahead, so that a request does not wait for Python and DuckDB to load
MAX_IDLE_WORKERS = 4  # workers kept for later requests once theirs closed
MAX_USES = 100  # requests one worker serves before it is replaced (its memory starts afresh)
_ROOT = Path(__file__).resolve().parents[2]


class WorkerStopped(Exception):
    """The worker gave no answer in time (killed), was stopped, or died (out of memory)."""

    def __init__(self, why: str, budget: Budget):
        self.why = why
        super().__init__({"stopped": "stopped", "time": f"stopped after {budget.seconds:g} s (time limit)",
                          "died": f"ran out of memory (the sandbox's {(MAX_MEMORY_BYTES + MAX_PROCESS_BYTES) // 2**20} MB "
                                  "for a query); make the data or the query smaller"}[why])


class QueryError(ValueError):
    """A query the worker refused or DuckDB could not run (IsolatedDatabase.run), in words a user can act on."""


class Worker:
    """A `python -m starsql.db.duck` process: requests and replies are pickled over its stdin/stdout."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-m", "starsql.db.duck"], cwd=_ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.requests = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.replies = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()
        self.dead: WorkerStopped | None = None
        self.started, self.uses = False, 0
        self._end = weakref.finalize(self, _end_worker, self.process, self.requests, self.replies)  # if never closed

    def wait_started(self) -> None:
        """Python and DuckDB loaded in the worker (its start does not count against a request's budget)."""
        if not self.started:
            if not self.replies.poll(START_LIMIT_S) or self.replies.recv() != "started":
                self.close()
                raise SchemaError(0, "", f"the DuckDB worker process did not start within {START_LIMIT_S:g} s "
                                         "(the server is busy); try again")
            self.started = True

    def call(self, budget: Budget, kind: str, *args):
        """The worker's reply to one request, within the budget (+ GRACE_S); WorkerStopped if none."""
        if self.dead:
            raise self.dead
        start = time.monotonic()
        deadline, why = start + budget.left + GRACE_S, "died"
        try:
            self.requests.send((kind, args, budget.seconds, budget.left))
            while not self.replies.poll(WATCH_S):
                if budget.stopped() or time.monotonic() > deadline:
                    why = "stopped" if budget.stopped() else "time"
                    break
            else:
                return self.replies.recv()
        except (EOFError, OSError):
            pass  # the worker is gone: the address-space cap ended it
        finally:
            budget.left = max(0.0, budget.left - (time.monotonic() - start))
        self.close()
        self.dead = WorkerStopped(why, budget)
        raise self.dead

    def close(self) -> None:
        self._end()


def _end_worker(process: subprocess.Popen, *pipes: Connection) -> None:
    for pipe in pipes:
        pipe.close()
    process.kill()
    process.wait()


_spares: list[Worker] = []
_spares_lock = threading.Lock()


def take_worker() -> Worker:
    """A started worker (a spare, if one is ready), and a new spare started in its place."""
    with _spares_lock:
        worker = _spares.pop() if _spares else None
        while len(_spares) < SPARE_WORKERS:
            _spares.append(Worker())
    worker = worker or Worker()
    worker.wait_started()
    worker.uses += 1
    return worker


def give_back(worker: Worker) -> None:
    """A worker whose database closed cleanly waits for the next request (up to MAX_USES), saving
    a process start; any other is ended. The next request opens a fresh DuckDB instance in it."""
    try:
        healthy = worker.uses < MAX_USES and worker.call(Budget(START_LIMIT_S), "close") == ("ok", None)
    except WorkerStopped:
        healthy = False
    with _spares_lock:
        if healthy and len(_spares) < MAX_IDLE_WORKERS:
            _spares.append(worker)
            return
    worker.close()


@dataclass
class IsolatedDatabase:
    """A DuckDatabase in a worker process: what workspace.py checks SQL on (`check` as below)."""
    worker: Worker
    tables: dict[str, list[str]]
    rows: int
    budget: Budget

    def check(self, result: CheckResult, engine_sql: str, max_rows: int) -> CheckResult:
        try:
            reply, value = self.worker.call(self.budget, "check", result, engine_sql, max_rows)
            if reply == "ok":
                return value
            result.error = value
            return result
        except WorkerStopped as stopped:
            result.stopped = stopped.why == "stopped"
            result.error = ("Stopped after {:g} s: the query ran too long on the rows.".format(self.budget.seconds)
                            if stopped.why == "time" else str(stopped))
            return result

    def run(self, sql: str, max_rows: int) -> tuple[list[str], list[list], bool]:
        """`sql`, one query, run as `run` runs it, in the worker: (columns, rows, truncated). Raises
        WorkerStopped when the budget is spent or Stop pressed (interrupted, or killed), QueryError else."""
        reply, value = self.worker.call(self.budget, "run", sql, max_rows)
        if reply == "interrupted":
            raise WorkerStopped("stopped" if self.budget.stopped() else "time", self.budget)
        if reply != "ok":
            raise QueryError(value)
        return value

    def close(self) -> None:
        give_back(self.worker)


def open_isolated(tables: list[Table], budget: Budget, path: "str | Path | None" = None,
                  rows: dict[str, list[tuple]] | None = None, settings: tuple[str, ...] = ()) -> IsolatedDatabase:
    """open_database in a worker process of its own. Raises SchemaError."""
    worker = take_worker()
    try:
        reply, value = worker.call(budget, "open", tables, path, rows, settings)
    except WorkerStopped as stopped:
        raise SchemaError(0, "", str(stopped)) from None
    if reply != "ok":
        give_back(worker)
        raise SchemaError(0, "", value if reply == "error" else str(WorkerStopped("time", budget)))
    return IsolatedDatabase(worker, *value, budget)


def _limit_address_space(extra_bytes: int) -> None:
    """Cap this process at what it uses now plus `extra_bytes`: allocations beyond fail (or end it).
    Linux only (where it reads its size); elsewhere the kill after the budget is the bound."""
    if not os.path.exists("/proc/self/statm"):
        return
    import resource

    with open("/proc/self/statm") as statm:
        now = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (now + extra_bytes, now + extra_bytes))


def _serve() -> None:
    """The worker's loop: one database at a time (open, check, ..., close), then the next request's."""
    requests, replies = Connection(0, writable=False), Connection(1, readable=False)
    sys.stdout = sys.stderr  # stdout carries the replies
    warm_up = open_duck()  # DuckDB's start-up and the modules its first load imports, before the cap
    load_tables(warm_up, [Table("t", [Column("x", "INTEGER")])], {"t": [(1,)]}, Budget(START_LIMIT_S))
    warm_up.close()
    _limit_address_space(MAX_PROCESS_BYTES)
    replies.send("started")
    database = None
    while True:
        try:
            kind, args, seconds, left = requests.recv()
        except EOFError:
            return
        budget = Budget(seconds)
        budget.left = left
        try:
            if kind == "open":
                database = open_database(args[0], budget, *args[1:])
                replies.send(("ok", (database.tables, database.rows)))
            elif kind == "close":
                if database is not None:
                    database.close()
                database = None
                gc.collect()  # the last request's rows, before the next request's
                replies.send(("ok", None))
            elif kind == "to_sqlite":  # an upload's copy (files.py): its views run here, not in the app
                from .files import UploadError, duckdb_to_sqlite
                try:
                    replies.send(("ok", duckdb_to_sqlite(*args)))
                except UploadError as error:
                    replies.send(("error", str(error)))
            elif kind == "run":  # a query on a live DuckDB file (live.DuckFile), no CheckResult around it
                statements = database.conn.extract_statements(args[0])
                if len(statements) != 1 or statements[0].type != READ:
                    replies.send(("error", "Only one query (SELECT) runs here; nothing was run."))
                else:
                    replies.send(("ok", run(database.conn, args[0], budget, args[1])))
            else:
                database.budget = budget
                replies.send(("ok", check(*args[:2], database, args[2])))
        except duckdb.InterruptException:
            replies.send(("interrupted", None))
        except (duckdb.Error, MemoryError) as error:  # a query's (kind "run"): a check's are in its result
            replies.send(("error", message(error, budget)))
        except SchemaError as error:
            replies.send(("error", error.error))
        except Exception as error:  # a bug: said, not hidden behind "out of memory"
            replies.send(("error", f"the check failed: {type(error).__name__}: {error}"))


if __name__ == "__main__":
    _serve()
