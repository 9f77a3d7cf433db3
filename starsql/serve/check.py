"""Check generated SQL against the user's schema in a throwaway in-memory SQLite database.

The schema box (CREATE TABLE statements, maybe INSERT rows) is loaded once per request into a fresh
`:memory:` database with SQLite's own limits on (starsql/sandbox.py: value and SQL length, expression
depth, database size, a capped printf), and every step that runs user SQL -- loading, listing the
tables, compiling, running -- spends one shared time budget. The SQL is compiled there with EXPLAIN,
which never executes it. SQLite itself says what a statement does: the authorizer sees every action
while it compiles, and the compiled program shows whether it opens a write transaction and returns
rows. Only a statement that returns rows and does nothing but read is run, on the example rows if
there are any, read-only (authorizer and `PRAGMA query_only`), under the time limit and caps on rows
and bytes. Identifiers the SQL uses but the schema lacks are listed (sqlglot reads the SQL, PRAGMA
table_info the schema). Nothing generated ever touches a real database.

`open_database(path=...)` opens an uploaded SQLite file instead, read-only with the same limits;
other dialects, uploads and live databases go through starsql/db/workspace.py, which calls this
module for SQLite and starsql/db/duck.py for DuckDB.
"""

import datetime
import decimal
import logging
import re
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlglot
from sqlglot import exp

from ..sandbox import MAX_DB_BYTES, MAX_VALUE_BYTES, Budget, authorizer, is_read, open_limited, time_limit
from ..schema import split_statements

# sqlglot warns when it falls back to a generic Command; here that only means "not a query".
logging.getLogger("sqlglot").setLevel(logging.ERROR)

TIME_LIMIT_S = 2.0  # one request's SQL steps together: load the schema, list it, compile, run
MAX_ROWS = 50
MAX_RESULT_BYTES = 2_000_000  # a result's values together; the rows stop there (truncated)
MAX_SQL_CHARS = 20_000  # longer SQL is refused before sqlglot or SQLite read it
ROWID_NAMES = {"rowid", "oid", "_rowid_"}

# Never allowed, not even to compile or to load the schema: they touch files or process-wide settings.
FORBIDDEN_ACTIONS = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_PRAGMA}
FORBIDDEN_FUNCTIONS = {"load_extension"}  # loads native code; refused, whatever the statement
SCHEMA_PRAGMAS = {"foreign_keys", "data_version"}  # common at the top of schema dumps; fts5 reads data_version
# Opcodes of a compiled program that change the database or the connection's transaction state:
# what sqlite3_stmt_readonly() looks at (Python's sqlite3 does not expose it).
WRITE_OPCODES = {"Vacuum", "JournalMode", "Checkpoint", "AutoCommit", "Savepoint"}


class SchemaError(ValueError):
    """A statement of the schema box that SQLite refused; `index` counts from 1 (0: the schema as a whole)."""

    def __init__(self, index: int, statement: str, error: str):
        self.index, self.statement, self.error = index, statement, error
        short = " ".join(statement.split())
        short = short if len(short) <= 80 else short[:77] + "..."
        if index:
            super().__init__(f"Schema statement {index} failed: {error} (in: {short})")
        else:
            super().__init__(f"The schema cannot be read: {error}" + (f" (in: {short})" if short else ""))


@dataclass
class CheckResult:
    sql: str
    valid: bool = False  # compiles against this schema
    error: str | None = None  # SQLite's error, or why the query was not run or was stopped
    unknown_identifiers: list[str] = field(default_factory=list)
    rows: list[list] | None = None  # result on the example rows; None when not run
    columns: list[str] | None = None
    writes_data: bool = False  # would change the database (or is no query): flagged and never run
    truncated: bool = False  # more rows than the cap
    cut: bool = False  # the model stopped at max_new_tokens, before the statement's end
    stopped: bool = False  # the user pressed Stop before the check finished
    dropped_turns: int = 0  # earlier turns of the conversation left out of the prompt to fit its budget
    dialect: str = "sqlite"  # the dialect `sql` is written in (starsql/db/dialects.py)
    skipped: list[str] = field(default_factory=list)  # schema statements with no schema or data, skipped
    not_verified: str | None = None  # what the embedded engine's check cannot verify for this dialect

    def to_dict(self) -> dict:
        return asdict(self)


def text_problem(text, what: str = "text") -> str | None:
    """Why `text` cannot go to SQLite, the tokenizer or JSON (not a string, a NUL, a lone surrogate), or None."""
    if not isinstance(text, str):
        return f"The {what} must be text (a string), not {type(text).__name__}."
    if "\x00" in text:
        return f"The {what} contains a NUL character (\\x00) at position {text.index(chr(0)) + 1}; remove it."
    bad = re.search("[\ud800-\udfff]", text)
    if bad:
        return (f"The {what} contains an invalid character (a lone surrogate, U+{ord(bad.group()):04X}) at "
                f"position {bad.start() + 1}; remove it or paste the text again.")
    return None


def _interrupted(error: BaseException) -> bool:
    return "interrupted" in str(error).lower()


def _sqlite_message(error: BaseException, budget: Budget) -> str:
    """SQLite's error in words a user can act on."""
    if isinstance(error, MemoryError):
        return "ran out of memory (the sandbox's memory budget); make the data or the query smaller"
    if _interrupted(error):
        return "stopped" if budget.stopped() else f"stopped after {budget.seconds:g} s (time limit)"
    text = str(error)
    if "database or disk is full" in text:
        return f"the data exceeds the sandbox's {MAX_DB_BYTES // 2**20} MB; use fewer or smaller example rows"
    if "string or blob too big" in text:
        return f"a value exceeds {MAX_VALUE_BYTES:,} bytes (the sandbox's limit)"
    return text


def _run_authorizer(action, arg1, arg2, db_name, trigger):
    """Reads only. A PRAGMA action here comes from a pragma table-valued function (pragma_table_info),
    which SQLite provides only for pragmas without side effects: PRAGMA statements are refused
    when compiled, before anything runs."""
    if _refused(action, arg1, arg2) and action != sqlite3.SQLITE_PRAGMA:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK if is_read(action, arg1) or action == sqlite3.SQLITE_PRAGMA else sqlite3.SQLITE_DENY


def _schema_authorizer(refusals: list[str]):
    """Anything a schema does, but ATTACH, DETACH, load_extension() and PRAGMAs (but foreign_keys);
    what it refused goes into `refusals`, for the message."""

    def check(action, arg1, arg2, db_name, trigger):
        if action == sqlite3.SQLITE_PRAGMA and str(arg1).lower() in SCHEMA_PRAGMAS:
            return sqlite3.SQLITE_OK
        refusal = _refused(action, arg1, arg2)
        if refusal:
            refusals.append(refusal.replace("; nothing was run.", " in the schema."))
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    return check


def load_schema(schema: str, seconds: "float | Budget" = TIME_LIMIT_S) -> sqlite3.Connection:
    """A fresh, limited in-memory database holding the schema (and its INSERT rows), then made
    read-only (PRAGMA query_only). Raises SchemaError."""
    budget = seconds if isinstance(seconds, Budget) else Budget(seconds)
    problem = text_problem(schema, "schema")
    if problem:
        raise SchemaError(0, "", problem)
    statements = split_statements(schema or "")
    conn, refusals = open_limited(), []
    try:
        with authorizer(conn, _schema_authorizer(refusals)), time_limit(conn, budget):
            for index, statement in enumerate(statements, start=1):
                try:
                    conn.execute(statement)
                except (sqlite3.Error, MemoryError) as error:
                    message = refusals[-1] if refusals else _sqlite_message(error, budget)
                    raise SchemaError(index, statement, message) from None
        conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def schema_tables(conn: sqlite3.Connection, seconds: "float | Budget" = TIME_LIMIT_S) -> dict[str, list[str]]:
    """Table (and view) name -> column names, as SQLite sees them. Listing a view compiles it, so
    it runs under the time limit too; a view SQLite cannot compile raises SchemaError."""
    budget = seconds if isinstance(seconds, Budget) else Budget(seconds)
    tables = {}
    with authorizer(conn, _run_authorizer), time_limit(conn, budget):
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') ORDER BY rowid")]
        for name in names:
            try:
                tables[name] = [r[1] for r in conn.execute("SELECT * FROM pragma_table_info(?)", (name,))]
            except (sqlite3.Error, MemoryError) as error:
                raise SchemaError(0, "", f"`{name}`: {_sqlite_message(error, budget)}") from None
    return tables


def row_counts(conn: sqlite3.Connection, seconds: "float | Budget" = TIME_LIMIT_S) -> dict[str, int]:
    budget = seconds if isinstance(seconds, Budget) else Budget(seconds)
    with time_limit(conn, budget):
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")]
        try:
            return {name: conn.execute(f'SELECT count(*) FROM "{name.replace(chr(34), chr(34) * 2)}"').fetchone()[0]
                    for name in names}
        except (sqlite3.Error, MemoryError) as error:
            raise SchemaError(0, "", _sqlite_message(error, budget)) from None


@dataclass
class Database:
    """A schema loaded once for a request: the connection, its tables and rows, and the time budget
    every later step on it spends. Close it when the request ends."""
    conn: sqlite3.Connection
    tables: dict[str, list[str]]
    rows: int
    budget: Budget

    def close(self) -> None:
        self.conn.close()


def open_database(schema: str, seconds: "float | Budget" = TIME_LIMIT_S, path: "str | Path | None" = None) -> Database:
    """Load `schema` and list it, all under one budget; or, given `path`, open that SQLite file
    read-only with the same limits (an upload; `schema` is then not used). Raises SchemaError."""
    budget = seconds if isinstance(seconds, Budget) else Budget(seconds)
    conn = load_schema(schema, budget) if path is None else open_limited(path=path)
    try:
        return Database(conn, schema_tables(conn, budget), sum(row_counts(conn, budget).values()), budget)
    except BaseException:
        conn.close()
        raise


# What sqlglot raises on SQL it cannot read; RecursionError on deep nesting (60 parentheses).
_SQLGLOT_ERRORS = (sqlglot.errors.ParseError, sqlglot.errors.TokenError, RecursionError)


def parse(sql: str, dialect: str = "sqlite") -> exp.Expression | None:
    if len(sql) > MAX_SQL_CHARS:
        return None
    try:
        return sqlglot.parse_one(sql, read=dialect)
    except _SQLGLOT_ERRORS:
        return None


# Statements that change something (Drop and Alter are not DDL subclasses in sqlglot).
_WRITE_NODES = (exp.DML, exp.DDL, exp.Drop, exp.Alter, exp.TruncateTable, exp.Analyze, exp.Command, exp.Pragma,
                exp.Attach, exp.Detach, exp.Transaction, exp.Commit, exp.Rollback, exp.Set, exp.Use)


def statement_kind(sql: str, dialect: str = "sqlite") -> str | None:
    """A name for the statement in messages: 'SELECT' (a query) or the kind of statement ('UPDATE',
    'DROP', 'REINDEX', ...); None if sqlglot cannot parse it. Whether it writes is the engine's call
    (check_sql), not this one."""
    tree = parse(sql, dialect)
    if tree is None:
        return None
    if isinstance(tree, (exp.Query, exp.Values)) and not any(isinstance(node, _WRITE_NODES) for node in tree.walk()):
        return "SELECT"
    if isinstance(tree, exp.Command):
        return str(tree.this).upper()
    if isinstance(tree, _WRITE_NODES):
        return tree.key.upper()
    return None  # an expression, not a statement ("hello world" reads as a column alias)


SQL_KEYWORDS = {"SELECT", "WITH", "VALUES", "INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER",
                "PRAGMA", "ATTACH", "DETACH", "VACUUM", "ANALYZE", "REINDEX", "EXPLAIN", "BEGIN", "COMMIT",
                "END", "ROLLBACK", "SAVEPOINT", "RELEASE"}


def looks_like_sql(text: str) -> bool:
    """Whether model output is SQL at all, as opposed to prose or nothing: it starts with a
    statement keyword. (Whether it is *valid* SQL is check_sql's question.)"""
    words = (text or "").lstrip(" \n\t(").split(None, 1)
    return bool(words) and words[0].upper().rstrip(";") in SQL_KEYWORDS


def format_sql(sql: str) -> str:
    """Pretty SQLite SQL; the input unchanged if sqlglot cannot read it."""
    if len(sql) > MAX_SQL_CHARS:
        return sql.strip()
    try:
        return sqlglot.transpile(sql, read="sqlite", write="sqlite", pretty=True)[0]
    except (*_SQLGLOT_ERRORS, IndexError):
        return sql.strip()


def unknown_identifiers(sql: str, tables: dict[str, list[str]], dialect: str = "sqlite") -> list[str]:
    """Tables and columns the SQL names that the schema does not have.

    Lenient where SQL allows a name without a table behind it: table aliases, CTE names,
    subquery aliases and their output columns, output-column aliases (ORDER BY n), rowid, and
    double-quoted names that are no column at all (SQLite then reads them as strings).
    """
    try:
        return _unknown_identifiers(sql, tables, dialect)
    except RecursionError:  # a tree too deep to walk: SQLite's own error says enough
        return []


def _unknown_identifiers(sql: str, tables: dict[str, list[str]], dialect: str) -> list[str]:
    tree = parse(sql, dialect)
    if tree is None or not isinstance(tree, (exp.Query, exp.Values, exp.DML, exp.DDL, exp.Drop, exp.Alter)):
        return []  # not a statement that names tables and columns
    schema = {name.lower(): {c.lower() for c in columns} for name, columns in tables.items()}
    unknown: list[str] = []

    # Names that a query defines itself, and the columns they output.
    derived_columns: set[str] = set()
    derived_names: set[str] = set()
    for node in tree.find_all(exp.CTE, exp.Subquery):
        if node.alias:
            derived_names.add(node.alias.lower())
        alias = node.args.get("alias")
        derived_columns |= {c.name.lower() for c in (alias.columns if alias else [])}
        if isinstance(node.this, exp.Query):
            derived_columns |= {name.lower() for name in node.this.named_selects}
    output_aliases = {node.alias.lower() for node in tree.find_all(exp.Alias) if node.alias}
    if isinstance(tree, exp.Create) and tree.find(exp.Table):  # the table it creates is new, not unknown
        derived_names.add(tree.find(exp.Table).name.lower())

    # FROM/JOIN sources: alias -> schema table (None for a CTE or an unknown table).
    sources: dict[str, str | None] = {}
    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):  # table-valued functions like json_each(...)
            continue
        name = table.name.lower()
        real = name if name in schema else None
        if real is None and name not in derived_names:
            unknown.append(table.name)
        sources[table.alias_or_name.lower()] = real
        sources.setdefault(name, real)

    lenient = "*" in derived_columns or any(real is None for real in sources.values())
    in_sources = set().union(*(schema[real] for real in sources.values() if real)) if sources else set()
    visible = in_sources | derived_columns | output_aliases | ROWID_NAMES
    if lenient or not sources:
        visible |= set().union(*schema.values()) if schema else set()

    for column in tree.find_all(exp.Column):
        if not isinstance(column.this, exp.Identifier):  # SELECT t.*
            continue
        name, qualifier = column.name.lower(), column.table.lower()
        if qualifier:
            if qualifier in sources or qualifier in schema:
                real = sources.get(qualifier, qualifier)
                if real and name not in schema[real] and name not in ROWID_NAMES:
                    unknown.append(f"{column.table}.{column.name}")
            elif qualifier not in derived_names:
                unknown.append(column.table)
        elif name not in visible and not column.this.quoted:
            unknown.append(column.name)
    return list(dict.fromkeys(unknown))


def jsonable(value):
    """A result value as JSON carries it: bytes as hex, dates and times as ISO text, decimals as
    numbers, lists and structs (DuckDB) element by element, anything else as its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() and abs(value) < 2**63 else float(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)  # UUID, timedelta, ...


def _run(conn: sqlite3.Connection, sql: str, budget: Budget, max_rows: int) -> tuple[list[str], list[list], bool]:
    """At most `max_rows` rows and MAX_RESULT_BYTES of values, read-only, within the budget."""
    with authorizer(conn, _run_authorizer), time_limit(conn, budget):
        return fetch_capped(conn.execute(sql), max_rows)


def fetch_capped(cursor, max_rows: int) -> tuple[list[str], list[list], bool]:
    """(columns, rows, truncated) of an executed DB-API cursor (SQLite's or DuckDB's): at most
    `max_rows` rows and MAX_RESULT_BYTES of values, fetched no further than needed."""
    columns = [d[0] for d in cursor.description or []]
    rows, size = [], 0
    while batch := cursor.fetchmany(min(64, max_rows + 1 - len(rows))):
        for row in batch:
            if len(rows) == max_rows:
                return columns, rows, True
            row = [jsonable(v) for v in row]
            size += sum(len(v) if isinstance(v, str) else len(str(v)) if isinstance(v, (list, dict)) else 8 for v in row)
            if size > MAX_RESULT_BYTES:
                return columns, rows, True
            rows.append(row)
    return columns, rows, False


def _refused(action: int, arg1, arg2) -> str | None:
    """Why SQLite must refuse this action of user SQL, or None."""
    if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in FORBIDDEN_FUNCTIONS:
        return f"{arg2}() is not allowed here; nothing was run."
    if action in FORBIDDEN_ACTIONS:
        name = {sqlite3.SQLITE_ATTACH: "ATTACH", sqlite3.SQLITE_DETACH: "DETACH"}.get(action, f"PRAGMA {arg1}")
        return f"Not allowed here: {name} (PRAGMA, ATTACH and DETACH are refused); nothing was run."
    return None


def classify(conn: sqlite3.Connection, sql: str, budget: Budget) -> tuple[str | None, bool, bool]:
    """Compile `sql` (EXPLAIN, never executed) and ask SQLite what it does:
    (error or None, writes: it would change the database or the transaction state, query: it returns rows)."""
    writes, refusals = False, []

    def watch(action, arg1, arg2, db_name, trigger):
        nonlocal writes
        if not is_read(action, arg1):
            writes = True
        refusal = _refused(action, arg1, arg2)
        if refusal:
            refusals.append(refusal)
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    try:
        with authorizer(conn, watch), time_limit(conn, budget):
            program = conn.execute("EXPLAIN " + sql).fetchall()
    except (sqlite3.Error, MemoryError) as error:
        message = refusals[0] if refusals else _sqlite_message(error, budget)
        return message, writes, False
    opcodes = {(row[1], row[3]) for row in program}  # (opcode, p2)
    writes = writes or any(op in WRITE_OPCODES or (op == "Transaction" and p2) for op, p2 in opcodes)
    return None, writes, any(op == "ResultRow" for op, _ in opcodes)


def new_result(sql, dialect: str = "sqlite") -> CheckResult:
    """The result every engine's check starts from: `sql` without its final ';', or an error already
    when it is no text, empty or too long to check."""
    problem = text_problem(sql, "SQL")
    result = CheckResult(sql=sql.strip().rstrip(";").strip() if not problem else (sql if isinstance(sql, str) else ""),
                         dialect=dialect)
    if problem:
        result.error = problem
    elif not result.sql:
        result.error = "No SQL to check."
    elif len(result.sql) > MAX_SQL_CHARS:
        result.error = f"The SQL is {len(result.sql):,} characters long; at most {MAX_SQL_CHARS:,} are checked."
    return result


def check_sql(sql: str, schema: "str | Database", seconds: float = TIME_LIMIT_S, max_rows: int = MAX_ROWS) -> CheckResult:
    """Is `sql` valid for `schema`? Which names does it use that the schema lacks? If the schema
    holds rows and `sql` only reads, what does it return (at most `max_rows` rows)? `schema` is the
    text, or a Database already open for this request (its budget then bounds the time; it stays open)."""
    result = new_result(sql)
    if result.error:
        return result
    if isinstance(schema, Database):
        database = schema
    else:
        try:
            database = open_database(schema, seconds)
        except SchemaError as error:
            result.error = str(error)
            return result
    try:
        return _check(result, database, max_rows)
    finally:
        if database is not schema:
            database.close()


WOULD_WRITE = "This statement would change the database, so it was not run."


def several_statements(result: CheckResult, count: int, writes: bool) -> CheckResult:
    result.writes_data = writes
    result.error = f"Expected one SQL statement, found {count}; nothing was run."
    return result


def verdict(result: CheckResult, error: str | None, writes: bool, query: bool, budget: Budget) -> bool:
    """Fill in `result` from what its engine said of its one statement (an error, whether it writes,
    whether it returns rows). True when it may run: it compiled, returns rows and does nothing but read."""
    result.writes_data = writes
    result.stopped = budget.stopped()
    if error:
        result.error = error
        return False
    result.valid = True
    if writes or not query:
        result.writes_data = True
        result.error = WOULD_WRITE
        return False
    return True


def _check(result: CheckResult, database: Database, max_rows: int) -> CheckResult:
    sql, conn, budget = result.sql, database.conn, database.budget
    result.unknown_identifiers = unknown_identifiers(sql, database.tables)
    statements = split_statements(sql)
    if len(statements) > 1:
        return several_statements(result, len(statements), any(classify(conn, s, budget)[1] for s in statements))
    if not verdict(result, *classify(conn, sql, budget), budget):
        return result
    if database.rows == 0:
        return result  # no example rows to run it on
    try:
        result.columns, result.rows, result.truncated = _run(conn, sql, budget, max_rows)
    except (sqlite3.Error, MemoryError) as error:
        result.stopped = budget.stopped()
        if _interrupted(error) and not result.stopped:
            result.error = f"Stopped after {budget.seconds:g} s: the query ran too long on the example rows."
        elif "not authorized" in str(error):  # the second guard: SQLite saw more than reads
            result.writes_data = True
            result.error = WOULD_WRITE
        else:
            result.error = _sqlite_message(error, budget)
    return result
