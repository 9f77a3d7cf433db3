"""Database schemas as the model sees them: CREATE TABLE statements, one per line.

sql-create-context ships schemas as `CREATE TABLE a (...); CREATE TABLE b (...)`; Spider ships
`tables.json`. Both end up in the same one-statement-per-line text.
"""

import json
import sqlite3
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


def quote_identifier(name: str) -> str:
    return name if name.replace("_", "").isalnum() and not name[0].isdigit() else '"' + name.replace('"', '""') + '"'


def spider_create_tables(table: dict) -> str:
    """CREATE TABLE statements for one entry of Spider's tables.json."""
    columns: dict[int, list[str]] = {i: [] for i in range(len(table["table_names_original"]))}
    for (table_index, column), column_type in zip(table["column_names_original"], table["column_types"]):
        if table_index >= 0:
            columns[table_index].append(f"{quote_identifier(column)} {_SPIDER_TYPES.get(column_type, 'VARCHAR')}")
    return "\n".join(
        f"CREATE TABLE {quote_identifier(name)} ({', '.join(columns[i])});"
        for i, name in enumerate(table["table_names_original"])
    )


def load_spider_schemas(tables_json: str | Path) -> dict[str, str]:
    """db_id -> CREATE TABLE text, for every database in a Spider tables.json."""
    path = Path(tables_json)
    if not path.is_file():
        raise FileNotFoundError(f"Spider tables file not found: {path}. Point it at Spider's tables.json.")
    return {table["db_id"]: spider_create_tables(table) for table in json.loads(path.read_text())}
