"""One request's view of the user's database, whatever it came as: the schema box (a dump in the
chosen dialect), an uploaded file, or a live database URL.

    ws = open_workspace(schema, "postgres")     # or database=path, or url="postgresql://..."
    ws.schema_text                              # what the model is prompted with
    ws.check("SELECT ... ILIKE ...")            # CheckResult: SQL in the chosen dialect, checked there
    ws.close()

The SQL is checked by the embedded engine that is faithful to the dialect (dialects.ENGINE): SQLite
for SQLite (today's path: check.open_database / check_sql, the schema box less the statements in
SQLITE_SKIPPED, and a hint when it is another dialect's dump), DuckDB for the others, the SQL
rewritten for it by dialects.to_engine; NOT_VERIFIED[dialect] says what that cannot show. A live
database runs the SQL itself (read-only, starsql/db/live.py), so nothing is left unverified. Loading,
listing, compiling and running all spend one time budget. DuckDB runs in a worker process with its
memory limit and an address-space cap (killed when the budget is spent); SQLite under the process's
heap limit. An upload is checked, and copied into the other engine if need be, once (files.py).
"""

import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..sandbox import Budget, time_limit
from ..schema import Table, render_schema, split_statements, sqlite_tables
from ..serve import check as sqlite_check
from ..serve.check import (MAX_ROWS, SCHEMA_PRAGMAS, TIME_LIMIT_S, CheckResult, SchemaError, new_result, statement_kind,
                           text_problem, unknown_identifiers)
from . import duck, files
from .dialects import ENGINE, ENGINE_SETTINGS, NOT_VERIFIED, DialectError, check_dialect, to_engine, translate
from .dumps import Skipped, dialect_hint, first_words, parse_dump

# Statements of a SQLite schema box that hold no schema or data but that SQLite's schema loader
# refuses (check.load_schema): skipped and listed, as in the other dialects' dumps. Not run, so
# nothing of the loader's hardening is lost. PRAGMA foreign_keys and data_version still run.
SQLITE_SKIPPED = [
    (re.compile(r"PRAGMA\s+(?:\w+\s*\.\s*)?(?!(?:" + "|".join(SCHEMA_PRAGMAS) + r")\b)\w", re.IGNORECASE),
     "a SQLite setting"),
    (re.compile(r"VACUUM\b", re.IGNORECASE), "maintenance"),
    (re.compile(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?[\"'`\[]?sqlite_", re.IGNORECASE),
     "SQLite's own table, which SQLite makes itself (the sqlite3 shell's .schema lists it)"),
]
# How the sqlite3 shell's .dump writes a virtual table (after PRAGMA writable_schema=ON, skipped).
_CATALOG_INSERT = re.compile(r"INSERT\s+INTO\s+[\"'`\[]?sqlite_(schema|master)\b", re.IGNORECASE)
_LEADING_COMMENT = re.compile(r"\s*(?:--[^\n]*|/\*.*?\*/)", re.DOTALL)


class _SqliteEngine:
    """Today's check: SQLite itself, on the schema box's statements or an uploaded SQLite file."""

    def __init__(self, database: sqlite_check.Database):
        self.database = database

    def check(self, sql: str, dialect: str, max_rows: int) -> CheckResult:
        return sqlite_check.check_sql(sql, self.database, max_rows=max_rows)

    def close(self) -> None:
        self.database.close()


class _DuckEngine:
    """DuckDB, for the PostgreSQL-like dialects: the user's SQL rewritten for it (to_engine)."""

    def __init__(self, database: duck.IsolatedDatabase):
        self.database = database

    def check(self, sql: str, dialect: str, max_rows: int) -> CheckResult:
        result = new_result(sql, dialect)
        if result.error:
            return result
        try:
            engine_sql = to_engine(result.sql, dialect)
        except DialectError as error:
            result.error = str(error)
            return result
        result.unknown_identifiers = unknown_identifiers(result.sql, self.database.tables, dialect)
        return self.database.check(result, engine_sql, max_rows)

    def close(self) -> None:
        self.database.close()


class _LiveEngine:
    """The user's own server: the SQL runs there, read-only (LiveDatabase.run refuses anything else)."""

    def __init__(self, database, tables: list[Table], budget: Budget):
        self.database, self.budget = database, budget
        self.columns = {t.name: t.column_names() for t in tables}

    def check(self, sql: str, dialect: str, max_rows: int) -> CheckResult:
        from .live import LiveError

        result = new_result(sql, dialect)
        if result.error:
            return result
        result.unknown_identifiers = unknown_identifiers(result.sql, self.columns, dialect)
        start = time.monotonic()
        try:
            server_sql = result.sql if dialect == self.database.dialect else translate(
                result.sql, write=self.database.dialect, read=dialect)
            result.columns, result.rows, result.truncated = self.database.run(
                server_sql, seconds=max(self.budget.left, 0.05), max_rows=max_rows)
            result.valid = True
        except (LiveError, DialectError) as error:
            result.error = str(error)
            if getattr(error, "kind", None) == "read_only":  # refused before it reached the server
                result.writes_data = True
                result.valid = statement_kind(result.sql, dialect) not in (None, "SELECT")
        finally:
            self.budget.left = max(0.0, self.budget.left - (time.monotonic() - start))
        result.stopped = self.budget.stopped()
        return result

    def close(self) -> None:
        self.database.close()


@dataclass
class Workspace:
    """One request's view of the user's database. Close it when the request ends."""
    dialect: str
    tables: list[Table]
    schema_text: str  # render_schema(tables): what the model is prompted with
    skipped: list[Skipped]
    rows: int  # rows the queries run on (0: they are compiled only); a live database: 1, they always run
    not_verified: str | None = None  # what the embedded engine cannot verify; None on a live database
    engine: object = field(default=None, repr=False)

    def check(self, sql: str, max_rows: int = MAX_ROWS) -> CheckResult:
        """Check `sql`, written in self.dialect: valid, unknown names, writes never run, and its rows."""
        result = self.engine.check(sql, self.dialect, max_rows)
        result.dialect, result.not_verified = self.dialect, self.not_verified
        result.skipped = [f"line {s.line} (`{s.words}`): {s.reason}" for s in self.skipped]
        return result

    def close(self) -> None:
        self.engine.close()


def _workspace(dialect: str, tables: list[Table], rows: int, engine, skipped=(), verified: bool = False) -> Workspace:
    return Workspace(dialect, tables, render_schema(tables), list(skipped), rows,
                     None if verified else NOT_VERIFIED[dialect], engine)


def _sqlite_workspace(dialect: str, database: sqlite_check.Database, tables: list[Table] | None = None,
                      skipped=()) -> Workspace:
    try:
        if tables is None:  # the schema box: its tables as SQLite reads them, keys included
            with time_limit(database.conn, database.budget):
                tables = sqlite_tables(database.conn)
        return _workspace(dialect, tables, database.rows, _SqliteEngine(database), skipped)
    except BaseException as error:
        database.close()
        if isinstance(error, sqlite3.Error):
            raise SchemaError(0, "", str(error)) from None
        raise


def _sqlite_schema(schema: str) -> tuple[str, list[Skipped], list[int]]:
    """The schema box less its SQLITE_SKIPPED statements, those as Skipped, and the number in the
    box of each statement kept (SchemaError's numbers are the box's)."""
    if text_problem(schema):
        return schema, [], []  # load_schema says what is wrong
    kept, numbers, skipped, at = [], [], [], 0
    for number, statement in enumerate(split_statements(schema), start=1):
        at = schema.find(statement, at)  # a statement is a stripped piece of the box's text
        head = statement
        while comment := _LEADING_COMMENT.match(head):
            head = head[comment.end():]
        head = head.lstrip()
        reason = next((why for pattern, why in SQLITE_SKIPPED if pattern.match(head)), None)
        if reason:
            line = schema.count("\n", 0, at + len(statement) - len(head)) + 1
            skipped.append(Skipped(line, first_words(head), reason))
        else:
            kept.append(statement)
            numbers.append(number)
        at += len(statement)
    # "\n;" ends a statement even after a -- comment; with nothing skipped the box is loaded as it is.
    return ("\n;\n".join(kept) if skipped else schema), skipped, numbers


def _schema_error(error: SchemaError, schema: str, dialect: str, numbers: list[int]) -> SchemaError:
    """`error` with the statement's number in the box, and which dialect to choose when the box
    looks like another dialect's dump (SQLite's own words are a bare syntax error)."""
    hint = dialect_hint(error.statement, dialect) or (isinstance(schema, str) and dialect_hint(schema, dialect))
    if _CATALOG_INSERT.match(error.statement):
        hint = ("the sqlite3 shell's .dump writes a virtual table into SQLite's catalog so: paste the output of "
                ".schema, or the table's CREATE VIRTUAL TABLE statement, instead")
    index = numbers[error.index - 1] if 0 < error.index <= len(numbers) else error.index
    return SchemaError(index, error.statement, f"{error.error} ({hint})" if hint else error.error)


def _duck_workspace(dialect: str, tables: list[Table], budget: Budget, skipped=(), **where) -> Workspace:
    database = duck.open_isolated(tables, budget, settings=ENGINE_SETTINGS.get(dialect, ()), **where)
    return _workspace(dialect, tables, database.rows, _DuckEngine(database), skipped)


def open_workspace(schema: str = "", dialect: str = "sqlite", database: "str | Path | list | None" = None,
                   url: str | None = None, seconds: "float | Budget" = TIME_LIMIT_S) -> Workspace:
    """The user's database for one request: a live `url`, else an uploaded `database` (a file path,
    or a list of data file paths; the schema box is then not read), else `schema`, a dump in
    `dialect`. `seconds` (or a Budget) bounds everything that runs user SQL, now and in check().
    Raises SchemaError, DumpError, DialectError, UploadError or LiveError: ValueErrors whose text
    says what to fix."""
    dialect = check_dialect(dialect)
    budget = seconds if isinstance(seconds, Budget) else Budget(seconds)
    if url:
        from .live import connect

        live = connect(url)
        tables = live.tables()
        return _workspace(dialect, tables, 1, _LiveEngine(live, tables, budget), verified=True)
    if database:
        upload = files.read_upload(database)
        path = files.engine_file(upload, ENGINE[dialect])
        if ENGINE[dialect] == "sqlite":
            return _sqlite_workspace(dialect, sqlite_check.open_database("", budget, path=path), upload.tables)
        return _duck_workspace(dialect, upload.tables, budget, path=path)
    if ENGINE[dialect] == "sqlite":  # today's check of the schema box, less the statements it skips
        box, skipped, numbers = _sqlite_schema(schema)
        try:
            database = sqlite_check.open_database(box, budget)
        except SchemaError as error:
            raise _schema_error(error, schema, dialect, numbers) from None
        return _sqlite_workspace(dialect, database, skipped=skipped)
    dump = parse_dump(schema, dialect)
    return _duck_workspace(dialect, dump.tables, budget, dump.skipped, rows=dump.rows)
