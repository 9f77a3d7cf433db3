"""SQL dialects: the names the app accepts, translation between them, and the engine that checks each.

The model writes the SQLite SQL it was trained on; users read and run their own dialect. `translate`
is sqlglot's transpiler plus the project's fixes for what it gets wrong on that SQLite (each found by
bench/dialect_fidelity.py, which runs Spider dev's gold queries on real PostgreSQL and MariaDB
servers). The app cannot run the user's server to check an answer, so `to_engine` rewrites the
user's-dialect SQL for an embedded engine with the same meaning where it can, and NOT_VERIFIED says,
per dialect, what that check cannot see.
"""

import sqlglot
from sqlglot import exp

DIALECTS = ("sqlite", "postgres", "mysql", "duckdb", "tsql", "snowflake", "bigquery")
DEFAULT_DIALECT = "sqlite"

# The embedded engine that checks each dialect. SQLite checks only SQLite: it has no types to speak
# of (a declared INTEGER column keeps text), so it cannot show a typed dialect's errors or results.
# DuckDB checks the rest: its SQL grew from PostgreSQL's grammar (ILIKE, `::` casts, booleans, real
# DATE/TIMESTAMP types, strict typing, case-sensitive `=` and LIKE), sqlglot translates every dialect
# here into it, and ENGINE_SETTINGS turn on integer division where the dialect divides integers so.
# It is embedded and read-only friendly, like SQLite; no MySQL- or SQL Server-like engine is.
ENGINE = {
    "sqlite": "sqlite",
    "postgres": "duckdb",
    "mysql": "duckdb",
    "duckdb": "duckdb",
    "tsql": "duckdb",
    "snowflake": "duckdb",
    "bigquery": "duckdb",
}

# Statements to run on the DuckDB connection before checking SQL of that dialect: PostgreSQL and
# SQL Server divide integers to an integer (7 / 2 = 3), DuckDB by default to a float (3.5).
ENGINE_SETTINGS = {
    "postgres": ("SET integer_division = true",),
    "tsql": ("SET integer_division = true",),
}

# One sentence per dialect: what the embedded check cannot verify (shown with every checked answer).
NOT_VERIFIED = {
    "sqlite": "Checked by SQLite itself; only the limits of time and rows differ from your own database.",
    "postgres": "Checked by DuckDB, not PostgreSQL: PostgreSQL-only functions, a GROUP BY that relies "
                "on a primary key, and your server's collation, extensions and settings are not verified.",
    "mysql": "Checked by DuckDB, not MySQL: `=`, ORDER BY and GROUP BY on text are case-sensitive here but "
             "case-insensitive under MySQL's default collation, and MySQL's implicit type conversions, "
             "loose GROUP BY and non-strict SQL modes are not verified.",
    "duckdb": "Checked by DuckDB itself; only the limits of time and rows differ from your own database.",
    "tsql": "Checked by DuckDB, not SQL Server: `=` and LIKE are case-sensitive here but not under SQL "
            "Server's default collation, and T-SQL-only functions and procedures are not verified.",
    "snowflake": "Checked by DuckDB, not Snowflake: Snowflake-only functions, semi-structured types "
                 "(VARIANT) and its number precision rules are not verified.",
    "bigquery": "Checked by DuckDB, not BigQuery: BigQuery-only functions, project.dataset names, "
                "STRUCT/ARRAY details and its NUMERIC precision are not verified.",
}

# Dialects whose LIKE is case-sensitive, unlike SQLite's (ASCII case-insensitive) LIKE. MySQL and
# SQL Server compare case-insensitively under their default collations, so their LIKE already agrees.
_CASE_SENSITIVE_LIKE = {"postgres", "duckdb", "snowflake", "bigquery"}
_HAS_ILIKE = {"postgres", "duckdb", "snowflake"}
# Comparisons whose right side SQLite reads as a string when it is a "double-quoted" name of no column.
_VALUE_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike)


class DialectError(ValueError):
    pass


def check_dialect(name) -> str:
    """`name` as sqlglot spells it, or DialectError saying which names work."""
    if isinstance(name, str) and name.strip().lower() in DIALECTS:
        return name.strip().lower()
    raise DialectError(f"Unknown SQL dialect {name!r}: choose one of {', '.join(DIALECTS)}.")


def _parse(sql: str, read: str) -> list[exp.Expression]:
    try:
        return [tree for tree in sqlglot.parse(sql, read=read) if tree is not None]
    except sqlglot.errors.SqlglotError as error:
        message = str(error).splitlines()[0][:300]
        raise DialectError(f"Cannot read this SQL as {read}: {message}. Check that it is {read} SQL, "
                           f"or choose the dialect it is written in.") from None


def _double_quoted_strings(tree: exp.Expression, columns: set[str] | None) -> None:
    """SQLite reads `name = "France"` as a string when no column is called France; Spider's SQL and the
    model rely on it, while every other dialect reads a name. Given the schema's `columns`, any such
    name of no column becomes a string; without them, only the right side of a comparison or IN list."""
    for column in list(tree.find_all(exp.Column)):
        if column.table or not column.this.quoted:
            continue
        if columns is not None:
            is_value = column.name.lower() not in columns
        else:
            parent = column.parent
            is_value = (isinstance(parent, _VALUE_COMPARISONS) and parent.expression is column) or (
                isinstance(parent, exp.In) and column in parent.expressions)
        if is_value:
            column.replace(exp.Literal.string(column.name))


def _case_insensitive_like(tree: exp.Expression, write: str) -> None:
    """SQLite's LIKE ignores ASCII case; PostgreSQL's, DuckDB's, Snowflake's and BigQuery's do not."""
    for like in list(tree.find_all(exp.Like)):
        if write in _HAS_ILIKE:
            like.replace(exp.ILike(this=like.this, expression=like.expression))
        else:
            like.replace(exp.Like(this=exp.Lower(this=like.this), expression=exp.Lower(this=like.expression)))


def _derived_limit_subqueries(tree: exp.Expression) -> None:
    """MySQL/MariaDB refuse LIMIT in an IN/ANY/ALL subquery; in a derived table inside it they accept it."""
    for node in list(tree.find_all(exp.In, exp.Any, exp.All)):
        key = "query" if isinstance(node, exp.In) else "this"
        query = node.args.get(key)
        query = query.unnest() if query is not None else None
        if isinstance(query, exp.Query) and query.args.get("limit"):
            derived = exp.select("*").from_(exp.Subquery(this=query.copy(), alias=exp.TableAlias(
                this=exp.to_identifier("limited"))))
            node.set(key, exp.Subquery(this=derived) if key == "query" else derived)


def translate(sql: str, write: str, read: str = "sqlite", columns: set[str] | None = None) -> str:
    """`sql`, written in `read`'s dialect, in `write`'s (statements joined by ";\\n").

    `columns` (optional, lower-case column names of the schema) tells SQLite's "double-quoted" strings
    from quoted column names exactly; without it a heuristic decides. DialectError if `sql` is unreadable."""
    write, read = check_dialect(write), check_dialect(read)
    if read == write:
        return sql
    out = []
    for tree in _parse(sql, read):
        if read == "sqlite":
            _double_quoted_strings(tree, columns)
            if write in _CASE_SENSITIVE_LIKE:
                _case_insensitive_like(tree, write)
        if write == "mysql":
            _derived_limit_subqueries(tree)
        out.append(tree.sql(dialect=write))
    return ";\n".join(out)


def to_engine(sql: str, dialect: str) -> str:
    """The user's-`dialect` SQL as ENGINE[dialect] runs it with the same meaning (run ENGINE_SETTINGS
    first). MySQL's and SQL Server's LIKE ignore case under their default collations: ILIKE in DuckDB."""
    dialect = check_dialect(dialect)
    engine = ENGINE[dialect]
    if engine == dialect:
        return sql
    out = []
    for tree in _parse(sql, dialect):
        if dialect in ("mysql", "tsql"):
            for like in list(tree.find_all(exp.Like)):
                like.replace(exp.ILike(this=like.this, expression=like.expression))
        out.append(tree.sql(dialect=engine))
    return ";\n".join(out)


def format_sql(sql: str, dialect: str) -> str:
    """`sql` pretty-printed in `dialect`; as given when sqlglot cannot read it (the check says why)."""
    try:
        trees = [tree for tree in sqlglot.parse(sql, read=check_dialect(dialect)) if tree is not None]
        return ";\n".join(tree.sql(dialect=dialect, pretty=True) for tree in trees) if trees else sql
    except sqlglot.errors.SqlglotError:
        return sql
