"""Live databases: real PostgreSQL and MariaDB servers (tests/servers.py), started once per module."""

import concurrent.futures
import glob
import hashlib
import logging
import operator
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from servers import (dump_mariadb, dump_postgres, free_port, mariadb_available, mariadb_server, postgres_available,
                     postgres_server)

from starsql.db import live
from starsql.db.dumps import parse_dump
from starsql.schema import render_schema


def _server(available, server):
    """A server's URL for the module's tests; they skip, saying why, where it cannot start here."""
    reason = available()
    if reason:
        pytest.skip(reason)
    with server() as url:
        yield url


@pytest.fixture(scope="module")
def postgres_url():
    yield from _server(postgres_available, postgres_server)


@pytest.fixture(scope="module")
def mariadb_url():
    yield from _server(mariadb_available, mariadb_server)


def _port_open(url: str) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", urlsplit(url).port)) == 0


def _execute(url: str, statements: list[str]) -> list[tuple]:
    """Run statements with the server's own driver (the tests' setup, not the code under test); the
    rows of the last one."""
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            for statement in statements:
                cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else []
    import pymysql

    parts = urlsplit(url)
    conn = pymysql.connect(host=parts.hostname, port=parts.port, user=parts.username, password=parts.password,
                           database=parts.path.lstrip("/"), autocommit=True)
    try:
        with conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
            return list(cursor.fetchall())
    finally:
        conn.close()


def test_servers_answer_and_dump(postgres_url, mariadb_url):
    """Both servers answer with the URL's password, and pg_dump / mysqldump dump their tables."""
    for url in (postgres_url, mariadb_url):
        assert _execute(url, ["CREATE TABLE smoke (id integer PRIMARY KEY)", "SELECT 1"]) == [(1,)]
    assert "CREATE TABLE public.smoke" in dump_postgres(postgres_url, schema_only=True)
    assert "CREATE TABLE `smoke`" in dump_mariadb(mariadb_url, no_data=True)
    for url in (postgres_url, mariadb_url):
        _execute(url, ["DROP TABLE smoke"])


def test_server_is_torn_down_when_the_block_fails():
    """A failing test still stops its server (port closed) and removes its directory."""
    if postgres_available():
        pytest.skip(postgres_available())
    with pytest.raises(RuntimeError, match="test failed"):
        with postgres_server() as url:
            [socket_file] = glob.glob(f"{tempfile.gettempdir()}/starsql-pg-*/.s.PGSQL.{urlsplit(url).port}")
            raise RuntimeError("test failed")
    assert not _port_open(url) and not Path(socket_file).parent.exists()


# ---------------------------------------------------------------------------------------------
# starsql.db.live against the real servers: one small shop, the same tables in each dialect

SHOP = {
    "postgres": [
        "CREATE TABLE customers (id serial PRIMARY KEY, name varchar(40) NOT NULL, joined date)",
        "CREATE TABLE orders (id integer PRIMARY KEY, customer_id integer REFERENCES customers(id), "
        "total numeric(10,2), placed timestamp)",
        "CREATE TABLE order_items (order_id integer REFERENCES orders(id), line integer, product text, "
        "PRIMARY KEY (order_id, line))",
        "CREATE VIEW big_orders AS SELECT id, total FROM orders WHERE total > 100",
        "CREATE MATERIALIZED VIEW customer_count AS SELECT count(*) AS n FROM customers",
    ],
    "mysql": [
        "CREATE TABLE customers (id int AUTO_INCREMENT PRIMARY KEY, name varchar(40) NOT NULL, joined date) "
        "ENGINE=InnoDB",
        "CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total decimal(10,2), placed datetime, "
        "FOREIGN KEY (customer_id) REFERENCES customers(id)) ENGINE=InnoDB",
        "CREATE TABLE order_items (order_id int, line int, product text, PRIMARY KEY (order_id, line), "
        "FOREIGN KEY (order_id) REFERENCES orders(id)) ENGINE=InnoDB",
        "CREATE VIEW big_orders AS SELECT id, total FROM orders WHERE total > 100",
    ],
}
SHOP_ROWS = [
    "INSERT INTO customers (name, joined) VALUES ('Ada', '2024-01-02'), ('Bob', '2024-03-04'), ('Cy', '2025-05-06')",
    "INSERT INTO orders VALUES (1, 1, 250.50, '2024-02-01 10:00:00'), (2, 1, 20.00, '2024-02-03 11:00:00'), "
    "(3, 2, 120.00, '2024-04-01 12:00:00')",
    "INSERT INTO order_items VALUES (1, 1, 'pen'), (1, 2, 'ink'), (3, 1, 'desk')",
]
# The prompt's schema text: the same whichever server it came from.
SHOP_SCHEMA = """CREATE TABLE big_orders (id INTEGER, total NUMERIC(10,2));
CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR(40), joined DATE);
CREATE TABLE order_items (order_id INTEGER, line INTEGER, product TEXT, PRIMARY KEY (order_id, line), FOREIGN KEY (order_id) REFERENCES orders(id));
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, total NUMERIC(10,2), placed DATETIME, FOREIGN KEY (customer_id) REFERENCES customers(id));"""
SLEEP = {"postgres": "SELECT pg_sleep(5)", "mysql": "SELECT SLEEP(5)"}


@pytest.fixture(scope="module", params=["postgres", "mysql"])
def shop(request):
    """(dialect, URL, LiveDatabase) of the shop on a real server of that dialect."""
    url = request.getfixturevalue(f"{'mariadb' if request.param == 'mysql' else 'postgres'}_url")
    _execute(url, SHOP[request.param] + SHOP_ROWS)
    yield request.param, url, live.connect(url)
    live.close_all()


def _password_of(url: str) -> str:
    return urlsplit(url).password


def test_introspection_gives_the_same_schema_with_keys_and_views(shop):
    dialect, url, db = shop
    assert db.dialect == dialect
    by_name = operator.attrgetter("name")
    tables = sorted(db.tables(), key=by_name)
    # The model sees the same schema from the live server as from its dump (pg_dump / mysqldump).
    dump = dump_postgres(url, schema_only=True) if dialect == "postgres" else dump_mariadb(url, no_data=True)
    assert render_schema(tables) == render_schema(sorted(parse_dump(dump, dialect).tables, key=by_name))
    if dialect == "postgres":  # a materialized view is a view to the model
        assert [(t.name, t.view, t.column_names()) for t in tables if t.name == "customer_count"] == \
            [("customer_count", True, ["n"])]
        tables = [table for table in tables if table.name != "customer_count"]
    assert render_schema(tables) == SHOP_SCHEMA  # ... and the same from either server
    assert [table.name for table in tables if table.view] == ["big_orders"]
    assert live.connect(url) is db  # one pool per URL, however often the app connects


def test_select_runs_with_a_row_limit(shop):
    dialect, url, db = shop
    columns, rows, truncated = db.run("SELECT name FROM customers ORDER BY id", seconds=5, max_rows=2)
    assert (columns, rows, truncated) == (["name"], [["Ada"], ["Bob"]], True)
    columns, rows, truncated = db.run(
        "SELECT c.name, SUM(o.total) AS spent FROM customers c JOIN orders o ON o.customer_id = c.id "
        "GROUP BY c.name ORDER BY spent DESC", seconds=5, max_rows=10)
    assert rows == [["Ada", 270.5], ["Bob", 120]] and not truncated  # decimals as JSON numbers


def test_a_huge_result_is_read_no_further_than_the_row_limit(shop):
    """Millions of rows: the first ones come back at once, not after the server has sent them all."""
    dialect, url, db = shop
    huge = {"postgres": "SELECT a.g * 100000 + b.g AS n FROM generate_series(1, 100000) a(g), "
                        "generate_series(1, 100000) b(g)",  # 10^10 rows, made as they are read
            "mysql": "SELECT seq AS n FROM seq_1_to_100000000"}[dialect]
    start = time.monotonic()
    columns, rows, truncated = db.run(huge, seconds=20, max_rows=3)
    assert (columns, len(rows), truncated) == (["n"], 3, True)
    assert time.monotonic() - start < 5


WRITES = ["DELETE FROM orders", "UPDATE customers SET name = 'Eve'", "INSERT INTO customers (name) VALUES ('Eve')",
          "DROP TABLE order_items", "TRUNCATE TABLE order_items", "SELECT 1; DELETE FROM orders",
          "CREATE TABLE t (x int)", "SELECT * INTO copy FROM customers"]


def test_writes_are_refused_and_the_data_is_unchanged(shop):
    dialect, url, db = shop
    before = [db.run(f"SELECT * FROM {name} ORDER BY 1, 2", 5, 100) for name in ("customers", "orders", "order_items")]
    # sqlglot lets these through as SELECTs; the read-only transaction stops them in the server.
    server_writes = {"postgres": ["SELECT nextval('customers_id_seq')", "SELECT setval('customers_id_seq', 99)"],
                     "mysql": ["SELECT NEXTVAL(customer_numbers)"]}[dialect]
    if dialect == "mysql":
        _execute(url, ["CREATE SEQUENCE customer_numbers"])
    for sql in WRITES + server_writes:
        with pytest.raises(live.LiveError, match="read-only: not run") as refused:
            db.run(sql, seconds=5, max_rows=10)
        assert refused.value.kind == "read_only", sql
        assert ("refused a write in a read-only transaction" in str(refused.value)) == (sql in server_writes), sql
    after = [db.run(f"SELECT * FROM {name} ORDER BY 1, 2", 5, 100) for name in ("customers", "orders", "order_items")]
    assert after == before


def test_a_slow_query_is_stopped_by_the_server(shop):
    dialect, url, db = shop
    start = time.monotonic()
    with pytest.raises(live.LiveError, match=r"stopped after 0.5 s") as stopped:
        db.run(SLEEP[dialect], seconds=0.5, max_rows=10)
    assert stopped.value.kind == "timeout" and time.monotonic() - start < 3
    # The pooled connection is back to normal: a longer limit lets the next query finish.
    assert db.run("SELECT count(*) FROM orders", seconds=5, max_rows=1) == (["count"] if dialect == "postgres"
                                                                             else ["count(*)"], [[3]], False)


def test_requests_at_once_share_the_pool(shop):
    """More requests at once than the pool keeps open: each gets a connection (overflow) and its rows."""
    dialect, url, db = shop
    sleep = {"postgres": "SELECT pg_sleep(0.3), {n} AS n", "mysql": "SELECT SLEEP(0.3), {n} AS n"}[dialect]
    with concurrent.futures.ThreadPoolExecutor(live.POOL_SIZE + live.POOL_OVERFLOW) as pool:
        results = list(pool.map(lambda n: live.connect(url).run(sleep.format(n=n), 5, 1)[1][0][1],
                                range(live.POOL_SIZE + live.POOL_OVERFLOW)))
    assert results == list(range(live.POOL_SIZE + live.POOL_OVERFLOW))


def test_wrong_password_unknown_database_and_closed_port_say_what_to_fix(shop, caplog):
    dialect, url, db = shop
    caplog.set_level(logging.DEBUG)
    parts = urlsplit(url)
    secret = _password_of(url)
    wrong = url.replace(f":{secret}@", ":Wrong-Pass-word-42@")
    no_database = url.rsplit("/", 1)[0] + "/no_such_db"
    closed_port = url.replace(f":{parts.port}/", f":{free_port()}/")
    for bad_url, kind, words in [(wrong, "login", "check the user name and password"),
                                 (no_database, "database", "does not exist"),
                                 (closed_port, "unreachable", "Cannot reach the database server")]:
        with pytest.raises(live.LiveError) as failed:
            live.connect(bad_url, seconds=3)
        message = str(failed.value)
        assert failed.value.kind == kind and words in message, message
        assert secret not in message and "Wrong-Pass-word-42" not in message and ":***@" in message
    assert secret not in caplog.text and "Wrong-Pass-word-42" not in caplog.text
    assert secret not in repr(db)


# ---------------------------------------------------------------------------------------------
# Without servers: files, URLs and drivers


def test_redact_hides_passwords_in_every_spelling():
    assert live.redact("postgresql://ann:s3cret@db.example:5432/shop") == "postgresql://ann:***@db.example:5432/shop"
    assert live.redact("mysql://ann:p@ss/w?rd@db:3306/shop") == "mysql://ann:***@db:3306/shop"  # typed unencoded
    assert live.redact("mysql://ann:p%40ss@db/shop") == "mysql://ann:***@db/shop"
    assert live.redact("postgresql://db/shop?user=ann&password=s3cret") == "postgresql://db/shop?user=ann&password=***"
    for unchanged in ("postgresql://ann@db/shop", "sqlite:////data/a@b.db", "duckdb:///shop.duckdb"):
        assert live.redact(unchanged) == unchanged


def test_bad_urls_and_a_missing_driver_say_what_to_fix(monkeypatch):
    cases = [("oracle://ann:s3cret@db/shop", "url", "use postgresql://"),
             ("postgresql://ann:s3cret@db:notaport/shop", "url", "postgresql://user:password@host:port/dbname"),
             ("shop.db", "url", "sqlite:///path/to.db"),
             ("postgresql://ann:s3cret@127.0.0.1:1/shop?colour=blue", "url", 'invalid connection option "colour"'),
             ("sqlite:///no/such/file.db", "database", "No SQLite database at no/such/file.db")]
    monkeypatch.setitem(sys.modules, "pymysql", None)  # as if pymysql were not installed
    cases.append(("mysql://ann:s3cret@127.0.0.1:3306/shop", "driver", "pip install pymysql"))
    for url, kind, words in cases:
        with pytest.raises(live.LiveError) as failed:
            live.connect(url)
        assert failed.value.kind == kind and words in str(failed.value) and "s3cret" not in str(failed.value), url


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sqlite_and_duckdb_files_are_read_only(tmp_path):
    import duckdb

    sqlite_path, duck_path = tmp_path / "shop.db", tmp_path / "shop.duckdb"
    with sqlite3.connect(sqlite_path) as conn:
        conn.executescript("CREATE TABLE customers (id INTEGER PRIMARY KEY, name varchar(40));"
                           "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id));"
                           "CREATE VIEW names AS SELECT name FROM customers;"
                           "INSERT INTO customers VALUES (1, 'Ada'), (2, 'Bob');")
    conn.close()
    with duckdb.connect(str(duck_path)) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR);"
                     "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id));"
                     "CREATE VIEW names AS SELECT name FROM customers;"
                     "INSERT INTO customers VALUES (1, 'Ada'), (2, 'Bob');")
    hashes = {path: _hash(path) for path in (sqlite_path, duck_path)}
    slow = {"sqlite": "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n",
            "duckdb": "SELECT count(*) FROM range(100000000000) t(x) WHERE x % 7 = 3"}
    for url in (f"sqlite:///{sqlite_path}", f"duckdb:///{duck_path}"):
        db = live.connect(url)
        tables = {table.name: table for table in db.tables()}
        assert set(tables) == {"customers", "orders", "names"} and tables["names"].view
        assert tables["orders"].primary_key == ["id"]
        assert [(k.columns, k.ref_table, k.ref_columns) for k in tables["orders"].foreign_keys] == \
            [(["customer_id"], "customers", ["id"])]
        assert db.run("SELECT name FROM customers ORDER BY id", 2, 1) == (["name"], [["Ada"]], True)
        for sql in ("DELETE FROM customers", "DROP TABLE orders", "UPDATE customers SET name = 'x'"):
            with pytest.raises(live.LiveError, match="read-only: not run"):
                db.run(sql, 2, 10)
        with pytest.raises(live.LiveError, match="stopped after 0.3 s"):
            db.run(slow[db.dialect], 0.3, 10)
        if db.dialect == "duckdb":  # a SELECT, but of another file: the sandbox has no file access
            with pytest.raises(live.LiveError, match="Not allowed here"):
                db.run(f"SELECT * FROM read_csv('{sqlite_path}')", 2, 10)
    live.close_all()
    assert {path: _hash(path) for path in hashes} == hashes


def test_duckdb_file_queries_are_bounded_by_their_process(tmp_path):
    """One call that builds gigabytes outside DuckDB's memory_limit and does not see interrupt() (an
    in-process DuckDB took 8 s and 1 GB of this process here) is stopped within the time limit."""
    import resource

    import duckdb

    from starsql.db import duck

    path = tmp_path / "t.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute("CREATE TABLE t (y VARCHAR); INSERT INTO t VALUES ('a')")
    db = live.connect(f"duckdb:///{path}")
    try:
        assert db.run("SELECT y FROM t", 2, 5) == (["y"], [["a"]], False)  # a worker is ready after this
        start, parent = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(live.LiveError, match="stopped after 1 s|ran out of memory"):
            db.run("SELECT length(lpad(y, 500000000, 'z')) FROM t", 1.0, 5)
        assert time.monotonic() - start < 1.0 + duck.GRACE_S + 1.0
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - parent < 100_000  # KB: not in this process
        assert db.run("SELECT count(*) FROM t", 2, 5) == (["count_star()"], [[1]], False)
    finally:
        live.close_all()
