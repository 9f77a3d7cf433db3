"""Database schemas as the model sees them: CREATE TABLE statements, one per line.

sql-create-context ships schemas as `CREATE TABLE a (...); CREATE TABLE b (...)`; Spider ships
`tables.json`; users bring dumps, files and live databases in many dialects. Whatever the source, a
schema becomes a list of `Table`s (columns, types, primary and foreign keys) and `render_schema` writes
the one text the model is prompted with, in training, evaluation and the app alike.
"""

import functools
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

# Spider's column types, mapped to the type names sql-create-context uses.
_SPIDER_TYPES = {"number": "INTEGER", "text": "VARCHAR", "time": "VARCHAR", "boolean": "VARCHAR", "others": "VARCHAR"}


def split_statements(sql: str) -> list[str]:
    """Split SQL text into complete statements (string literals may hold ';'), without the ';'."""
    statements, current = [], ""
    for piece in sql.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n\t;"):
                statements.append(current.strip().rstrip(";").strip())
            current = ""
    if current.strip(" \n\t;"):
        statements.append(current.strip().rstrip(";").strip())
    return statements


def normalize_schema(schema: str) -> str:
    """One statement per line, each ending in ';'."""
    return "\n".join(statement + ";" for statement in split_statements(schema))


@functools.lru_cache(maxsize=4096)
def _bare_name_works(name: str) -> bool:
    """Does SQLite read `name` unquoted as a column name? It, not a keyword list, knows its keywords."""
    try:
        sqlite3.connect(":memory:").execute(f"CREATE TABLE t ({name} INTEGER, {name}_ INTEGER)")
        return True
    except sqlite3.Error:
        return False


def quote_identifier(name: str) -> str:
    """`name` as SQL spells it: bare when it is a plain word SQLite reads as a name, else in double quotes."""
    plain = name.replace("_", "").isalnum() and name.isascii() and not name[0].isdigit() and _bare_name_works(name)
    return name if plain else '"' + name.replace('"', '""') + '"'


@dataclass
class Column:
    name: str
    type: str = "TEXT"  # as the source spells it, mapped to a SQLite-style name where the source is another dialect


@dataclass
class ForeignKey:
    columns: list[str]
    ref_table: str
    ref_columns: list[str]


@dataclass
class Table:
    name: str
    columns: list[Column]
    primary_key: list[str] = field(default_factory=list)
    foreign_keys: list[ForeignKey] = field(default_factory=list)
    view: bool = False  # a view is shown to the model as a table of its columns

    def column_names(self) -> list[str]:
        return [column.name for column in self.columns]


def render_table(table: Table) -> str:
    """One CREATE TABLE statement: a one-column primary key inline, a composite one and the foreign
    keys as table constraints, so the model sees how tables join."""
    single_key = table.primary_key[0] if len(table.primary_key) == 1 else None
    parts = [f"{quote_identifier(c.name)} {c.type or 'TEXT'}" + (" PRIMARY KEY" if c.name == single_key else "")
             for c in table.columns]
    if len(table.primary_key) > 1:
        parts.append(f"PRIMARY KEY ({', '.join(map(quote_identifier, table.primary_key))})")
    for key in table.foreign_keys:
        parts.append(f"FOREIGN KEY ({', '.join(map(quote_identifier, key.columns))}) REFERENCES "
                     f"{quote_identifier(key.ref_table)}({', '.join(map(quote_identifier, key.ref_columns))})")
    return f"CREATE TABLE {quote_identifier(table.name)} ({', '.join(parts)});"


def render_schema(tables: list[Table]) -> str:
    """The schema text of the prompt: one CREATE TABLE statement per line, in the given order."""
    return "\n".join(render_table(table) for table in tables)


def spider_tables(entry: dict) -> list[Table]:
    """The tables of one entry of Spider's tables.json, with its primary and foreign keys."""
    tables = [Table(name, []) for name in entry["table_names_original"]]  # sqlite_* ones are dropped below
    columns = entry["column_names_original"]
    for (table_index, name), column_type in zip(columns, entry["column_types"]):
        if table_index >= 0:
            tables[table_index].columns.append(Column(name, _SPIDER_TYPES.get(column_type, "VARCHAR")))
    for key in entry.get("primary_keys", []):
        for index in key if isinstance(key, list) else [key]:  # newer releases list composite keys
            table_index, name = columns[index]
            tables[table_index].primary_key.append(name)
    for source, target in entry.get("foreign_keys", []):
        (source_table, source_name), (target_table, target_name) = columns[source], columns[target]
        tables[source_table].foreign_keys.append(
            ForeignKey([source_name], entry["table_names_original"][target_table], [target_name]))
    return [table for table in tables if not table.name.lower().startswith("sqlite_")]  # SQLite's own


def spider_create_tables(entry: dict) -> str:
    """CREATE TABLE statements, with keys, for one entry of Spider's tables.json."""
    return render_schema(spider_tables(entry))


def sqlite_tables(conn: sqlite3.Connection) -> list[Table]:
    """The tables and views of a SQLite database, with declared types and keys, in creation order."""
    tables = []
    for name, kind in conn.execute("SELECT name, type FROM sqlite_schema WHERE type IN ('table', 'view') "
                                   "AND name NOT LIKE 'sqlite_%' ORDER BY rowid").fetchall():
        info = conn.execute("SELECT name, type, pk FROM pragma_table_info(?)", (name,)).fetchall()
        table = Table(name, [Column(c, t or "TEXT") for c, t, _ in info], view=kind == "view")
        table.primary_key = [c for c, _, pk in sorted(info, key=lambda row: row[2]) if pk]
        keys: dict[int, ForeignKey] = {}  # SQLite numbers foreign keys from the last declared
        for key_id, _, ref_table, column, ref_column in conn.execute(
                "SELECT id, seq, \"table\", \"from\", \"to\" FROM pragma_foreign_key_list(?) ORDER BY id DESC, seq", (name,)):
            key = keys.setdefault(key_id, ForeignKey([], ref_table, []))
            key.columns.append(column)
            key.ref_columns.append(ref_column or column)  # REFERENCES t without columns means t's primary key
        table.foreign_keys = list(keys.values())
        tables.append(table)
    return tables


def load_spider_schemas(tables_json: str | Path) -> dict[str, str]:
    """db_id -> CREATE TABLE text, for every database in a Spider tables.json."""
    path = Path(tables_json)
    if not path.is_file():
        raise FileNotFoundError(f"Spider tables file not found: {path}. Point it at Spider's tables.json.")
    return {table["db_id"]: spider_create_tables(table) for table in json.loads(path.read_text())}
