"""open_workspace / Workspace.check: the schema box in any dialect, checked by the engine faithful to
it (SQLite for SQLite, exactly as before; DuckDB for the rest), with that dialect's meaning, read-only,
under the time, row, byte and memory limits; and a live database checked by running there."""

import re
import resource
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from starsql.db import duck
from starsql.db.dialects import DialectError
from starsql.db.dumps import DumpError
from starsql.db.live import close_all
from starsql.db.workspace import open_workspace
from starsql.sandbox import Budget
from starsql.serve.check import SchemaError, check_sql, new_result

# A pg_dump as it looks (schema-qualified names, SET lines, an owner, a COPY block, keys added later).
PG_DUMP = """--
-- PostgreSQL database dump
--
SET statement_timeout = 0;
SET client_encoding = 'UTF8';
SELECT pg_catalog.set_config('search_path', '', false);

CREATE TABLE public.orders (
    id integer NOT NULL,
    customer character varying(40),
    placed_at timestamp without time zone DEFAULT now(),
    quantity integer,
    paid boolean
);
ALTER TABLE public.orders OWNER TO shop;

COPY public.orders (id, customer, placed_at, quantity, paid) FROM stdin;
1	Alice	2024-01-05 10:00:00	7	t
2	bob	2024-02-10 11:30:00	3	f
3	ALICIA	2024-02-11 09:00:00	10	t
\\.

ALTER TABLE ONLY public.orders
    ADD CONSTRAINT orders_pkey PRIMARY KEY (id);
"""
MYSQL_SCHEMA = """CREATE TABLE `orders` (
  `id` int NOT NULL AUTO_INCREMENT,
  `customer` varchar(40) DEFAULT NULL,
  `placed_at` datetime DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `customer_idx` (`customer`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
INSERT INTO `orders` VALUES (1,'Alice','2024-01-05 10:00:00'),(2,'bob','2023-02-10 11:30:00'),(3,'ALICIA','2024-02-11 09:00:00');
"""
SQLITE_SCHEMA = """CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name VARCHAR, country VARCHAR, age INTEGER);
INSERT INTO singer VALUES (1, 'Joe Sharp', 'Netherlands', 52), (2, 'Justin Brown', 'France', 29), (3, 'Rose White', 'France', 41);"""
DUCKDB_SCHEMA = "CREATE TABLE t (x INTEGER, y VARCHAR); INSERT INTO t VALUES (1, 'a'), (2, 'b');"
RUNAWAY = "SELECT count(*) FROM range(CAST(1e12 AS BIGINT))"  # DuckDB SQL: 10^12 rows


@pytest.fixture(scope="module")
def postgres():
    ws = open_workspace(PG_DUMP, "postgres", seconds=3600)  # one budget for the module; limits are tested apart
    yield ws
    ws.close()


def test_postgres_dump_prompts_the_normalised_schema(postgres):
    assert postgres.schema_text == ("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer VARCHAR(40), "
                                    "placed_at DATETIME, quantity INTEGER, paid BOOLEAN);")
    assert postgres.rows == 3
    assert [s.words for s in postgres.skipped][:2] == ["SET statement_timeout = 0", "SET client_encoding = 'UTF8'"]
    assert "DuckDB" in postgres.not_verified


@pytest.mark.parametrize("sql, rows", [
    ("SELECT customer FROM orders WHERE customer ILIKE 'ali%' ORDER BY id", [["Alice"], ["ALICIA"]]),
    ("SELECT customer FROM orders WHERE customer LIKE 'Ali%'", [["Alice"]]),  # LIKE is case-sensitive
    ("SELECT placed_at::date FROM orders WHERE id = 2", [["2024-02-10"]]),
    ("SELECT quantity / 2, 7 / 2, 7 / 2.0 FROM orders WHERE id = 1", [[3, 3, 3.5]]),  # integer division
    ("SELECT count(*) FROM orders WHERE paid", [[2]]),  # booleans
    ("SELECT EXTRACT(MONTH FROM placed_at) AS m, count(*) FROM orders GROUP BY 1 ORDER BY 1", [[1, 1], [2, 2]]),
])
def test_postgres_sql_runs_with_postgres_meaning(postgres, sql, rows):
    result = postgres.check(sql)
    assert result.valid and result.error is None, result.error
    assert result.rows == rows
    assert result.dialect == "postgres" and result.not_verified == postgres.not_verified
    assert result.skipped[0] == "line 4 (`SET statement_timeout = 0`): " + postgres.skipped[0].reason


def test_unknown_names_are_listed_in_the_dialect(postgres):
    result = postgres.check("SELECT o.nickname FROM orders AS o WHERE o.customer::text ILIKE 'a%'")
    assert not result.valid and "nickname" in result.error
    assert result.unknown_identifiers == ["o.nickname"]


def test_mysql_dump_checked_with_mysql_meaning():
    ws = open_workspace(MYSQL_SCHEMA, "mysql")
    try:
        result = ws.check("SELECT `customer` FROM `orders` WHERE YEAR(placed_at) = 2024 AND customer LIKE 'ali%' ORDER BY id")
        assert result.valid, result.error
        assert result.rows == [["Alice"], ["ALICIA"]]  # MySQL's LIKE ignores case under its default collation
        assert "MySQL" in result.not_verified
    finally:
        ws.close()


@pytest.mark.parametrize("sql", [
    "SELECT name, age FROM singer WHERE country = 'France' ORDER BY age DESC",
    "SELECT nickname FROM singer",
    "DROP TABLE singer",
    "PRAGMA writable_schema = ON",
    RUNAWAY,
])
def test_sqlite_dialect_is_exactly_the_old_check(sql):
    ws = open_workspace(SQLITE_SCHEMA, "sqlite", seconds=0.5)
    try:
        new = ws.check(sql).to_dict()
    finally:
        ws.close()
    old = check_sql(sql, SQLITE_SCHEMA, seconds=0.5).to_dict()
    assert new.pop("not_verified").startswith("Checked by SQLite itself") and old.pop("not_verified") is None
    assert new == old
    assert ws.schema_text.startswith("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY")


def test_bad_input_raises_what_to_fix():
    with pytest.raises(SchemaError, match="statement 1 failed"):
        open_workspace("CREATE TABLE a (x INTEGER,,)", "sqlite")
    with pytest.raises(DialectError, match="Unknown SQL dialect 'oracle'"):
        open_workspace(SQLITE_SCHEMA, "oracle")
    with pytest.raises(DumpError):
        open_workspace("CREATE TABLE (", "postgres")


@pytest.mark.parametrize("schema, dialect", [(PG_DUMP, "postgres"), (MYSQL_SCHEMA, "mysql")],
                         ids=["pg_dump", "mysqldump"])
def test_another_dialects_dump_with_sqlite_chosen_says_which_to_choose(schema, dialect):
    with pytest.raises(SchemaError) as raised:
        open_workspace(schema, "sqlite")
    assert f"choose the dialect {dialect}" in str(raised.value) and "syntax error" in raised.value.error
    assert raised.value.index == 1 and re.search(r"\b(SET|CREATE TABLE)\b", raised.value.statement)  # SQLite's fields
    with pytest.raises(SchemaError) as raised:  # SQLite reads backticks: they alone are no sign of MySQL
        open_workspace("CREATE TABLE `t` (`x` INTEGER,,)", "sqlite")
    assert "choose the dialect" not in str(raised.value)


# The sqlite3 shell's .schema of a table with AUTOINCREMENT after ANALYZE, with settings and a VACUUM around it.
SQLITE_SHELL_SCHEMA = """PRAGMA journal_mode=WAL;
BEGIN TRANSACTION;
CREATE TABLE a(id INTEGER PRIMARY KEY AUTOINCREMENT, n TEXT);
CREATE TABLE sqlite_sequence(name,seq);
CREATE INDEX ai ON a(n);
CREATE TABLE sqlite_stat1(tbl,idx,stat);
/* a comment */ PRAGMA main.page_size = 4096;
PRAGMA foreign_keys=ON;
INSERT INTO a VALUES(1,'x');
COMMIT;
VACUUM;
"""


def test_sqlite_statements_without_schema_or_data_are_skipped():
    ws = open_workspace(SQLITE_SHELL_SCHEMA, "sqlite")
    try:
        assert [t.name for t in ws.tables] == ["a"]
        assert [(s.line, s.words) for s in ws.skipped] == [
            (1, "PRAGMA journal_mode=WAL"), (4, "CREATE TABLE sqlite_sequence(name,seq)"),
            (6, "CREATE TABLE sqlite_stat1(tbl,idx,stat)"), (7, "PRAGMA main.page_size = 4096"), (11, "VACUUM")]
        result = ws.check("SELECT n FROM a")
        assert result.rows == [["x"]] and "line 11 (`VACUUM`): maintenance" in result.skipped
    finally:
        ws.close()
    shell_schema = Path(__file__).parent / "fixtures" / "dumps" / "shop.sqlite_schema.sql"  # the real shell's
    ws = open_workspace(shell_schema.read_text(), "sqlite")
    ws.close()
    assert [s.words for s in ws.skipped] == ["CREATE TABLE sqlite_sequence(name,seq)"]
    with pytest.raises(SchemaError, match=r"statement 4 failed: .*in: CREATE TABLE b \(x,,\)"):  # the box's number
        open_workspace("PRAGMA cache_size = 10; CREATE TABLE a (x); VACUUM; CREATE TABLE b (x,,);", "sqlite")
    with pytest.raises(SchemaError, match="Not allowed here: ATTACH"):  # not skipped: it reaches a file
        open_workspace("CREATE TABLE a (x); ATTACH DATABASE '/tmp/starsql-evil.db' AS evil;", "sqlite")
    with pytest.raises(SchemaError, match="paste the output of .schema"):  # .dump's virtual table, its PRAGMA skipped
        open_workspace("PRAGMA writable_schema=ON; INSERT INTO sqlite_schema(type,name,tbl_name,rootpage,sql)"
                       "VALUES('table','f','f',0,'CREATE VIRTUAL TABLE f USING fts5(body)');", "sqlite")


@pytest.mark.parametrize("sql", ["DELETE FROM orders", "UPDATE orders SET quantity = 0", "DROP TABLE orders",
                                 "INSERT INTO orders (id) VALUES (9)", "CREATE TABLE t AS SELECT * FROM orders",
                                 "ALTER TABLE orders ADD COLUMN x integer", "TRUNCATE orders"])
def test_writes_are_flagged_and_never_run(postgres, sql):
    result = postgres.check(sql)
    assert result.writes_data and result.rows is None and "not run" in result.error
    assert postgres.check("SELECT count(*), sum(quantity) FROM orders").rows == [[3, 20]]
    assert postgres.check("SELECT count(*) FROM information_schema.tables").rows == [[1]]


@pytest.mark.parametrize("sql, words", [
    ("ATTACH '{target}' AS evil", "Not allowed here: ATTACH"),
    ("COPY orders TO '{target}'", "Not allowed here: COPY"),
    ("SET threads = 8", "Not allowed here: SET"),
    ("INSTALL httpfs", "Not allowed here"),
    ("LOAD httpfs", "Not allowed here"),
    ("PRAGMA database_size", "Not allowed here: PRAGMA"),
    ("SELECT * FROM read_csv('{target}')", "files, extensions and settings are off limits"),
    ("SELECT * FROM read_text('/etc/passwd')", "files, extensions and settings are off limits"),
    ("SELECT * FROM glob('/*')", "files, extensions and settings are off limits"),
    ("SELECT 1; DROP TABLE orders", "one SQL statement"),
])
def test_files_extensions_and_settings_are_out_of_reach(postgres, tmp_path, sql, words):
    target = tmp_path / "evil.csv"
    sql = sql.format(target=target)  # straight to DuckDB: not rewritten from PostgreSQL first
    result = postgres.engine.database.check(new_result(sql, "duckdb"), sql, 5)
    assert not result.valid and words in result.error, result.error
    assert result.rows is None
    assert not target.exists()
    assert postgres.check("SELECT current_setting('threads')").rows == [[duck.THREADS]]


def test_time_limit_stops_a_runaway_query():
    ws = open_workspace(DUCKDB_SCHEMA, "duckdb", seconds=1.0)
    try:
        start = time.monotonic()
        result = ws.check(RUNAWAY)
        assert time.monotonic() - start < 2.0
        assert result.valid and result.rows is None and "Stopped after 1 s" in result.error
    finally:
        ws.close()


def test_stop_button_ends_the_check():
    stop = threading.Event()
    ws = open_workspace(DUCKDB_SCHEMA, "duckdb", seconds=Budget(30, cancelled=stop.is_set))
    try:
        threading.Timer(0.3, stop.set).start()
        start = time.monotonic()
        result = ws.check(RUNAWAY)
        assert time.monotonic() - start < 1.5 and result.stopped
    finally:
        ws.close()


def test_row_byte_and_memory_limits(postgres):
    result = postgres.check("SELECT * FROM generate_series(1, 1000)", max_rows=5)
    assert result.rows == [[1], [2], [3], [4], [5]] and result.truncated
    result = postgres.check("SELECT repeat('x', 100000) FROM generate_series(1, 100)")
    assert result.truncated and len(result.rows) < 50  # MAX_RESULT_BYTES
    start = time.monotonic()
    result = postgres.check("SELECT array_agg(g) FROM generate_series(1, 2000000000) AS t(g)")
    assert "ran out of memory" in result.error and f"{duck.MAX_MEMORY_BYTES // 2**20} MB" in result.error
    assert time.monotonic() - start < 5
    assert postgres.check("SELECT count(*) FROM orders").rows == [[3]]  # the connection still works


@pytest.mark.parametrize("sql", [
    "SELECT max(length(replace(repeat(y, 100000), 'a', repeat(y, 100000)))) FROM t",  # 10 GB of string
    "SELECT length(lpad(y, 500000000, 'z')) FROM t",  # one call that interrupt() cannot stop
])
def test_what_duckdb_does_not_limit_is_limited_by_its_process(sql):
    """One function call can build gigabytes outside DuckDB's memory_limit and not see interrupt():
    the worker process's address-space cap and the kill after the budget bound it."""
    ws = open_workspace("CREATE TABLE t (y VARCHAR); INSERT INTO t VALUES ('a');", "duckdb", seconds=1.0)
    start, parent = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        result = ws.check(sql)
        assert time.monotonic() - start < 1.0 + duck.GRACE_S + 1.0
        assert result.rows is None and re.search("ran out of memory|stopped after 1 s", result.error, re.I)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - parent < 100_000  # KB: not in this process
    finally:
        ws.close()


def test_one_budget_for_the_whole_request():
    ws = open_workspace(DUCKDB_SCHEMA, "duckdb", seconds=0.5)
    try:
        assert "Stopped after 0.5 s" in ws.check(RUNAWAY).error
        start = time.monotonic()
        assert "Stopped after 0.5 s" in ws.check(RUNAWAY).error  # nothing left for a second try
        assert time.monotonic() - start < 0.3
    finally:
        ws.close()


def test_live_database_runs_the_sql_itself(tmp_path):
    path = tmp_path / "shop.db"
    conn = sqlite3.connect(path)
    conn.executescript(SQLITE_SCHEMA)
    conn.close()
    before = path.read_bytes()
    ws = open_workspace("", "sqlite", url=f"sqlite:///{path}")
    try:
        assert ws.schema_text.startswith("CREATE TABLE singer")
        result = ws.check("SELECT name FROM singer WHERE age > 40 ORDER BY age")
        assert result.valid and result.rows == [["Rose White"], ["Joe Sharp"]]
        assert result.not_verified is None
        result = ws.check("DELETE FROM singer")
        assert result.writes_data and result.rows is None
    finally:
        ws.close()
    assert path.read_bytes() == before


def test_the_package_docstring_names_every_module():
    import starsql.db

    modules = sorted(p.name for p in Path(starsql.db.__file__).parent.glob("*.py") if p.name != "__init__.py")
    assert [m for m in modules if f"`{m}`:" not in starsql.db.__doc__] == []


def test_numbers_keep_their_precision():
    ws = open_workspace("CREATE TABLE m (a real, b numeric, c numeric(10,2), d bigint);"
                        "INSERT INTO m VALUES (0.1, 1.23456, 3.14159, 9007199254740993);", "postgres")
    try:
        assert ws.check("SELECT a, b, c, d FROM m").rows == [[0.1, 1.23456, 3.14, 9007199254740993]]
    finally:
        ws.close()


SERVER_TABLE = ("CREATE TABLE orders (id integer PRIMARY KEY, customer varchar(40), placed_at timestamp NULL, "
                "quantity integer, paid boolean)")
SERVER_ROWS = ("INSERT INTO orders VALUES (1, 'Alice', '2024-01-05 10:00:00', 7, true), "
               "(2, 'bob', '2023-02-10 11:30:00', 3, false), (3, 'ALICIA', '2024-02-11 09:00:00', 10, true)")
FIDELITY_SQL = {
    "postgres": ["SELECT customer FROM orders WHERE customer ILIKE 'ali%' ORDER BY id",
                 "SELECT customer FROM orders WHERE customer LIKE 'Ali%' ORDER BY id",
                 "SELECT id, quantity / 2, placed_at::date FROM orders ORDER BY id",
                 "SELECT paid, count(*) FROM orders GROUP BY paid ORDER BY paid"],
    "mysql": ["SELECT `customer` FROM `orders` WHERE customer LIKE 'ali%' ORDER BY id",
              "SELECT YEAR(placed_at), count(*) FROM orders GROUP BY YEAR(placed_at) ORDER BY 1",
              "SELECT id, quantity DIV 2, DATE(placed_at) FROM orders ORDER BY id",
              "SELECT id FROM orders WHERE paid ORDER BY id"],
}


@pytest.fixture(scope="module", params=["postgres", "mysql"])
def server(request):
    """A real server of the dialect with the orders table: (dialect, URL, its dump)."""
    import servers

    dialect = request.param
    name = "postgres" if dialect == "postgres" else "mariadb"
    reason = getattr(servers, f"{name}_available")()
    if reason:
        pytest.skip(reason)
    with getattr(servers, f"{name}_server")() as url:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://")
                                          .replace("mysql://", "mysql+pymysql://"))
        with engine.begin() as conn:
            conn.exec_driver_sql(SERVER_TABLE)
            conn.exec_driver_sql(SERVER_ROWS)
        engine.dispose()
        yield dialect, url, getattr(servers, f"dump_{name}")(url)
        close_all()  # the pooled connections, so that the server stops at once


def test_live_server_and_its_dump_answer_alike(server):
    """The same SQL on the real server (live workspace) and on its dump checked through DuckDB."""
    dialect, url, dump = server
    live = open_workspace("", dialect, url=url)
    dumped = open_workspace(dump, dialect)
    try:
        assert live.schema_text == dumped.schema_text
        for sql in FIDELITY_SQL[dialect]:
            on_server, on_duckdb = live.check(sql), dumped.check(sql)
            assert on_server.valid and on_server.not_verified is None, on_server.error
            assert on_duckdb.valid and on_duckdb.rows == on_server.rows, (sql, on_duckdb.error)
        refused = live.check("DELETE FROM orders")
        assert refused.writes_data and refused.rows is None
        password = url.split("@")[0].rsplit(":", 1)[1]
        assert password not in str(live.check("SELECT nosuch FROM orders").to_dict())
        assert live.check("SELECT count(*) FROM orders").rows == [[3]]
    finally:
        live.close()
        dumped.close()


def test_a_worker_serves_the_next_request_with_nothing_of_the_last():
    first = open_workspace("CREATE TABLE secret (x TEXT); INSERT INTO secret VALUES ('mine');", "postgres")
    worker = first.engine.database.worker
    first.close()
    second = open_workspace("CREATE TABLE other (y INTEGER); INSERT INTO other VALUES (1);", "postgres")
    try:
        assert second.engine.database.worker is worker  # no new process to start
        result = second.check("SELECT x FROM secret")
        assert not result.valid and "secret" in result.error
        assert second.check("SELECT y FROM other").rows == [[1]]
    finally:
        second.close()


@pytest.mark.parametrize("sql", ["-- hi", "/* nothing */", "-- a\n;"])
def test_sql_that_is_only_a_comment_says_there_is_nothing_to_check(postgres, sql):
    result = postgres.check(sql)
    assert not result.valid and result.error == "No SQL to check." and result.rows is None
