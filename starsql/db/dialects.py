"""SQL dialects: the names the app accepts and translation between them (sqlglot).

The model writes the SQLite SQL it was trained on; users read and run their own dialect.
"""

import sqlglot

DIALECTS = ("sqlite", "postgres", "mysql", "duckdb", "tsql", "snowflake", "bigquery")
DEFAULT_DIALECT = "sqlite"


class DialectError(ValueError):
    pass


def check_dialect(name) -> str:
    """`name` as sqlglot spells it, or DialectError saying which names work."""
    if isinstance(name, str) and name.strip().lower() in DIALECTS:
        return name.strip().lower()
    raise DialectError(f"Unknown SQL dialect {name!r}: choose one of {', '.join(DIALECTS)}.")


def translate(sql: str, write: str, read: str = "sqlite") -> str:
    """`sql`, written in `read`'s dialect, in `write`'s."""
    if read == write:
        return sql
    return ";\n".join(sqlglot.transpile(sql, read=read, write=write))
