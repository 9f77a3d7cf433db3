"""Check generated SQL against the user's schema in a throwaway in-memory SQLite database.

The schema box (CREATE TABLE statements, maybe INSERT rows) is loaded into a fresh `:memory:`
database; the SQL is compiled there with EXPLAIN, which never executes it. Identifiers the SQL
uses but the schema lacks are listed (sqlglot reads the SQL, PRAGMA table_info the schema). A
read-only query is then run on the example rows, if there are any, under a time limit and a row
cap. Nothing generated ever touches a real database, and statements that would change data are
flagged and never run: sqlglot classifies the statement, and SQLite's authorizer refuses
anything but reads when a query runs (the second guard, in case sqlglot misreads it).
"""

import logging
import sqlite3
from dataclasses import asdict, dataclass, field

import sqlglot
from sqlglot import exp

from ..sandbox import authorizer, is_read, read_only_authorizer, time_limit
from ..schema import split_statements

# sqlglot warns when it falls back to a generic Command; here that only means "not a query".
logging.getLogger("sqlglot").setLevel(logging.ERROR)

TIME_LIMIT_S = 2.0
MAX_ROWS = 50
MAX_VALUE_BYTES = 1_000_000  # longest string or blob a query may build (SQLITE_LIMIT_LENGTH)
ROWID_NAMES = {"rowid", "oid", "_rowid_"}

# Never allowed, not even to compile or to load the schema: they touch files or process-wide settings.
FORBIDDEN_ACTIONS = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_PRAGMA}
SCHEMA_PRAGMAS = {"foreign_keys"}  # harmless and common at the top of schema dumps


class SchemaError(ValueError):
    """A statement of the schema box that SQLite refused; `index` counts from 1."""

    def __init__(self, index: int, statement: str, error: str):
        self.index, self.statement, self.error = index, statement, error
        short = " ".join(statement.split())
        short = short if len(short) <= 80 else short[:77] + "..."
        super().__init__(f"Schema statement {index} failed: {error} (in: {short})")


@dataclass
class CheckResult:
    sql: str
    valid: bool = False  # compiles against this schema
    error: str | None = None  # SQLite's error, or why the query was not run or was stopped
    unknown_identifiers: list[str] = field(default_factory=list)
    rows: list[list] | None = None  # result on the example rows; None when not run
    columns: list[str] | None = None
    writes_data: bool = False  # would change data: flagged and never run
    truncated: bool = False  # more rows than the cap

    def to_dict(self) -> dict:
        return asdict(self)


def _schema_authorizer(action, arg1, arg2, db_name, trigger):
    if action == sqlite3.SQLITE_PRAGMA and str(arg1).lower() in SCHEMA_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY if action in FORBIDDEN_ACTIONS else sqlite3.SQLITE_OK


def _interrupted(error: sqlite3.Error) -> bool:
    return "interrupted" in str(error).lower()


def load_schema(schema: str, seconds: float = TIME_LIMIT_S) -> sqlite3.Connection:
    """A fresh in-memory database holding the schema (and its INSERT rows). Raises SchemaError."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    statements = split_statements(schema or "")
    try:
        with authorizer(conn, _schema_authorizer), time_limit(conn, seconds):
            for index, statement in enumerate(statements, start=1):
                try:
                    conn.execute(statement)
                except sqlite3.Error as error:
                    message = f"stopped after {seconds:g} s (time limit)" if _interrupted(error) else str(error)
                    raise SchemaError(index, statement, message) from None
                except ValueError as error:  # e.g. a NUL character
                    raise SchemaError(index, statement, str(error)) from None
    except SchemaError:
        conn.close()
        raise
    return conn


def schema_tables(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """Table (and view) name -> column names, as SQLite sees them."""
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') ORDER BY rowid")]
    return {name: [r[1] for r in conn.execute("SELECT * FROM pragma_table_info(?)", (name,))] for name in names}


def row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")]
    return {name: conn.execute(f'SELECT count(*) FROM "{name.replace(chr(34), chr(34) * 2)}"').fetchone()[0] for name in names}


def parse(sql: str) -> exp.Expression | None:
    try:
        return sqlglot.parse_one(sql, read="sqlite")
    except (sqlglot.errors.ParseError, sqlglot.errors.TokenError):
        return None


# Statements that change something (Drop and Alter are not DDL subclasses in sqlglot).
_WRITE_NODES = (exp.DML, exp.DDL, exp.Drop, exp.Alter, exp.TruncateTable, exp.Analyze, exp.Command, exp.Pragma,
                exp.Attach, exp.Detach, exp.Transaction, exp.Commit, exp.Rollback, exp.Set, exp.Use)


def statement_kind(sql: str) -> str | None:
    """'SELECT' (any read-only query) or the kind of statement that changes something
    ('UPDATE', 'DROP', 'PRAGMA', ...); None if sqlglot cannot parse it."""
    tree = parse(sql)
    if tree is None:
        return None
    if isinstance(tree, (exp.Query, exp.Values)) and not any(isinstance(node, _WRITE_NODES) for node in tree.walk()):
        return "SELECT"
    if isinstance(tree, exp.Command):
        return str(tree.this).upper()
    if isinstance(tree, _WRITE_NODES):
        return tree.key.upper()
    return None  # an expression, not a statement ("hello world" reads as a column alias)


def writes_data(sql: str) -> bool:
    kind = statement_kind(sql)
    return kind is not None and kind != "SELECT"


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
    try:
        return sqlglot.transpile(sql, read="sqlite", write="sqlite", pretty=True)[0]
    except (sqlglot.errors.ParseError, sqlglot.errors.TokenError, IndexError):
        return sql.strip()


def unknown_identifiers(sql: str, tables: dict[str, list[str]]) -> list[str]:
    """Tables and columns the SQL names that the schema does not have.

    Lenient where SQL allows a name without a table behind it: table aliases, CTE names,
    subquery aliases and their output columns, output-column aliases (ORDER BY n), rowid, and
    double-quoted names that are no column at all (SQLite then reads them as strings).
    """
    tree = parse(sql)
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


def _jsonable(value):
    if isinstance(value, bytes):
        return value.hex()
    return value


def _run(conn: sqlite3.Connection, sql: str, seconds: float, max_rows: int) -> tuple[list[str], list[list], bool]:
    with authorizer(conn, read_only_authorizer), time_limit(conn, seconds):
        cursor = conn.execute(sql)
        columns = [d[0] for d in cursor.description or []]
        rows = cursor.fetchmany(max_rows + 1)
    return columns, [[_jsonable(v) for v in row] for row in rows[:max_rows]], len(rows) > max_rows


def check_sql(sql: str, schema: str, seconds: float = TIME_LIMIT_S, max_rows: int = MAX_ROWS) -> CheckResult:
    """Is `sql` valid for `schema`? Which names does it use that the schema lacks? If the schema
    holds rows and `sql` only reads, what does it return (at most `max_rows` rows, `seconds`)?"""
    sql = (sql or "").strip().rstrip(";").strip()
    result = CheckResult(sql=sql)
    if not sql:
        result.error = "No SQL to check."
        return result
    try:
        conn = load_schema(schema, seconds)
    except SchemaError as error:
        result.error = str(error)
        return result
    try:
        tables = schema_tables(conn)
        result.unknown_identifiers = unknown_identifiers(sql, tables)
        statements = split_statements(sql)
        result.writes_data = any(writes_data(s) for s in statements)
        if len(statements) > 1:
            result.error = f"Expected one SQL statement, found {len(statements)}; nothing was run."
            return result

        # Compile only: EXPLAIN never executes, so a write can be checked against the schema too.
        denied: list[int] = []

        def compile_authorizer(action, arg1, *args):
            if not is_read(action, arg1):
                denied.append(action)
            return sqlite3.SQLITE_DENY if action in FORBIDDEN_ACTIONS else sqlite3.SQLITE_OK

        try:
            with authorizer(conn, compile_authorizer), time_limit(conn, seconds):
                conn.execute("EXPLAIN " + sql).fetchall()
        except (sqlite3.Error, ValueError) as error:
            result.error = str(error)
            if "not authorized" in result.error:
                result.error = "Not allowed here: PRAGMA, ATTACH and DETACH are refused; nothing was run."
            result.writes_data = result.writes_data or bool(denied)
            return result
        result.valid = True
        if denied:  # SQLite saw more than reads, whatever sqlglot thought
            result.writes_data = True
        if result.writes_data:
            result.error = "This statement would change the database, so it was not run."
            return result

        if sum(row_counts(conn).values()) == 0:
            return result  # no example rows to run it on
        try:
            result.columns, result.rows, result.truncated = _run(conn, sql, seconds, max_rows)
        except sqlite3.Error as error:
            if _interrupted(error):
                result.error = f"Stopped after {seconds:g} s: the query ran too long on the example rows."
            elif "not authorized" in str(error):
                result.writes_data = True
                result.error = "This statement would change the database, so it was not run."
            else:
                result.error = str(error)
        return result
    finally:
        conn.close()
