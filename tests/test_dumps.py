"""Dumps (starsql/db/dumps.py): real pg_dump, mysqldump and SQLite dumps of one "shop" database read
into the same tables and rows; what holds no schema is skipped with a reason; problems come all at once.

The dumps in tests/fixtures/dumps/ come from the real tools; `python tests/test_dumps.py` writes them
again from servers started from the Debian packages (tests/servers.py), and test_live_dumps checks that
fresh dumps still read the same wherever the binaries exist.
"""

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starsql.db.dialects import DialectError  # noqa: E402
from starsql.db.dumps import DumpError, parse_dump  # noqa: E402
from starsql.schema import render_schema  # noqa: E402
from tests import servers  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dumps"

# What every dump of the shop database reads as: the prompt's schema text ...
SHOP_SCHEMA = """\
CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR(100), email VARCHAR(200), tier TEXT, active BOOLEAN, joined DATETIME, note TEXT);
CREATE TABLE order_lines (order_id INTEGER, line_no INTEGER, sku VARCHAR(20), quantity INTEGER, PRIMARY KEY (order_id, line_no), FOREIGN KEY (order_id) REFERENCES orders(id), FOREIGN KEY (sku) REFERENCES products(sku));
CREATE TABLE orders (id INTEGER PRIMARY KEY, number INTEGER, customer_id INTEGER, placed DATETIME, fiscal_year INTEGER, FOREIGN KEY (customer_id) REFERENCES customers(id));
CREATE TABLE products (sku VARCHAR(20) PRIMARY KEY, title TEXT, price NUMERIC(10,2), weight_kg REAL, added DATE);
CREATE TABLE sales (order_id INTEGER, name VARCHAR(100), tier TEXT, placed DATETIME, line_count INTEGER);"""

# ... and its rows, tricky values included (quotes, ';', '--', a tab, a newline, a backslash, NULL, unicode).
SHOP_ROWS = {
    "customers": [
        (1, "Ann O'Brien", "ann@example.com", "pro", 1, "2024-01-02 03:04:05", 'says "hi"; then leaves'),
        (2, "Zoë 東京 🎉", None, "free", 0, "2024-02-29 23:59:59", "tab\there, newline\nthere, back\\slash"),
        (3, "Bob -- not a comment /* nor this */", "bob@example.com", "team", 1, "2023-12-31 00:00:00", ""),
    ],
    "order_lines": [(1, 1, "A-1", 2), (1, 2, "B-2", 1), (2, 1, "A-1", 5)],
    "orders": [(1, 1000, 1, "2024-03-01 10:00:00", 2024), (2, 1001, 2, "2024-03-02 11:30:00", 2024),
               (3, 1002, 1, "2024-03-03 09:15:00", None)],
    "products": [("A-1", "Widget 'deluxe'", 12.5, 0.25, "2024-01-01"), ("B-2", "Gadget\\N", 3.0, None, None)],
}

# fixture file -> the dialect it is written in; the *_schema dumps hold no rows.
DUMPS = {
    "shop.pg_dump.sql": "postgres", "shop.pg_dump_schema.sql": "postgres",
    "shop.mysqldump.sql": "mysql", "shop.mysqldump_schema.sql": "mysql",
    "shop.sqlite_dump.sql": "sqlite", "shop.sqlite_schema.sql": "sqlite",
}


# -- making the dumps with the real tools ------------------------------------------------------

def postgres_dumps() -> dict[str, str]:
    import psycopg

    with servers.postgres_server() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute((FIXTURES / "shop_postgres.sql").read_text())
        return {"shop.pg_dump.sql": servers.dump_postgres(url),
                "shop.pg_dump_schema.sql": servers.dump_postgres(url, schema_only=True)}


def mariadb_dumps() -> dict[str, str]:
    import pymysql
    from pymysql.constants import CLIENT

    with servers.mariadb_server() as url:
        parts = urlsplit(url)
        conn = pymysql.connect(host=parts.hostname, port=parts.port, user=parts.username, password=parts.password,
                               database=parts.path.lstrip("/"), client_flag=CLIENT.MULTI_STATEMENTS, autocommit=True)
        with conn, conn.cursor() as cursor:
            cursor.execute((FIXTURES / "shop_mariadb.sql").read_text())
            while cursor.nextset():
                pass
        return {"shop.mysqldump.sql": servers.dump_mariadb(url),
                "shop.mysqldump_schema.sql": servers.dump_mariadb(url, no_data=True)}


def sqlite_dumps(directory: Path) -> dict[str, str]:
    """`.dump` and `.schema` of the sqlite3 shell; Python's iterdump and sqlite_schema where it is missing."""
    path = directory / "shop.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript((FIXTURES / "shop_sqlite.sql").read_text())
    shell = shutil.which("sqlite3")
    if shell:
        def run(command):
            return subprocess.run([shell, str(path), command], capture_output=True, text=True, check=True).stdout
        return {"shop.sqlite_dump.sql": run(".dump"), "shop.sqlite_schema.sql": run(".schema")}
    with sqlite3.connect(path) as conn:
        schema = "".join(sql + ";\n" for (sql,) in conn.execute("SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL"))
        return {"shop.sqlite_dump.sql": "\n".join(conn.iterdump()) + "\n", "shop.sqlite_schema.sql": schema}


def read_fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def assert_shop(dump, with_rows: bool):
    assert render_schema(dump.tables) == SHOP_SCHEMA
    assert [t.name for t in dump.tables if t.view] == ["sales"]
    assert dump.rows == (SHOP_ROWS if with_rows else {})


# -- the fixtures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DUMPS)
def test_every_dump_reads_as_the_same_schema_and_rows(name):
    """pg_dump, mysqldump and SQLite (schema only and full) give one prompt text and the same rows."""
    dump = parse_dump(read_fixture(name), DUMPS[name])
    assert_shop(dump, with_rows="schema" not in name)


def test_what_holds_no_schema_is_skipped_with_its_line_and_a_reason():
    text = read_fixture("shop.pg_dump.sql")
    lines = text.split("\n")
    skipped = parse_dump(text, "postgres").skipped
    for entry in skipped:  # the line of the statement's first word, not of the comment above it
        assert lines[entry.line - 1].lstrip().startswith(entry.words.split()[0]), entry
    reasons = {entry.words.split(" ")[0] + " " + entry.words.split(" ")[1]: entry.reason for entry in skipped}
    assert reasons["SET statement_timeout"] == "a session setting"
    assert reasons["SELECT pg_catalog.set_config('search_path',"] == "a session setting"
    assert "'free', 'pro', 'team'" in reasons["CREATE TYPE"] and "TEXT" in reasons["CREATE TYPE"]
    assert {"GRANT SELECT", "COMMENT ON", "CREATE INDEX", "CREATE SEQUENCE", "ALTER SEQUENCE", "CREATE FUNCTION",
            "CREATE TRIGGER"} <= set(reasons)
    assert {e.reason for e in skipped if e.words.startswith("\\")} == {"a psql command"}  # \restrict KEY
    owners = [e for e in skipped if "OWNER TO" in e.words or e.reason == "changes an owner"]
    assert owners and all(e.reason == "changes an owner" for e in owners)
    unique_line = lines.index("    ADD CONSTRAINT customers_email_key UNIQUE (email);")  # 0-based: the line above
    assert "unique key" in next(e.reason for e in skipped if e.line == unique_line)

    mysql = parse_dump(read_fixture("shop.mysqldump.sql"), "mysql").skipped
    assert {e.reason for e in mysql if e.words.startswith(("LOCK TABLES", "UNLOCK TABLES"))} == {"locks tables"}
    assert any(e.words.startswith("SET @OLD_CHARACTER_SET_CLIENT") for e in mysql)  # a /*!40101 ... */ directive
    assert any("TRIGGER" in e.words for e in mysql)  # inside DELIMITER ;; ... ;;


@pytest.mark.parametrize("name", ["shop.pg_dump.sql", "shop.mysqldump.sql"])
def test_a_dump_read_in_the_wrong_dialect_says_which_to_choose(name):
    """Every problem at once, each with its line and first words, and the dialect that would read it."""
    text, right = read_fixture(name), DUMPS[name]
    wrong = "mysql" if right == "postgres" else "postgres"
    with pytest.raises(DumpError) as caught:
        parse_dump(text, wrong)
    problems = caught.value.problems
    assert len(problems) >= 2
    assert all(p.startswith("line ") and "(`" in p for p in problems)
    assert any(f"choose the dialect {right}" in p for p in problems)
    assert str(caught.value).count("\n- ") == min(len(problems), 20)


# -- live servers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_dumps(tmp_path_factory):
    """Fresh dumps from real servers, where the binaries exist (each part skips on its own)."""
    made = sqlite_dumps(tmp_path_factory.mktemp("sqlite"))
    for available, make in ((servers.postgres_available, postgres_dumps), (servers.mariadb_available, mariadb_dumps)):
        if available() is None:
            made.update(make())
    return made


@pytest.mark.parametrize("name", DUMPS)
def test_live_dumps_read_as_the_fixtures_do(live_dumps, name):
    if name not in live_dumps:
        reason = servers.postgres_available() if DUMPS[name] == "postgres" else servers.mariadb_available()
        pytest.skip(f"cannot make {name} here: {reason}")
    assert_shop(parse_dump(live_dumps[name], DUMPS[name]), with_rows="schema" not in name)


if __name__ == "__main__":  # write the fixtures again from real servers
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        made = {**sqlite_dumps(Path(directory)), **postgres_dumps(), **mariadb_dumps()}
    for file_name, text in made.items():
        (FIXTURES / file_name).write_text(text, encoding="utf-8")
        print("wrote", FIXTURES / file_name)
