"""Dumps (starsql/db/dumps.py): real pg_dump, mysqldump and SQLite dumps of one "shop" database read
into the same tables and rows; what holds no schema is skipped with a reason; problems come all at once.

The dumps in tests/fixtures/dumps/ come from the real tools; `python tests/test_dumps.py` writes them
again from servers started from the Debian packages (tests/servers.py), and test_live_dumps checks that
fresh dumps still read the same wherever the binaries exist.
"""

import contextlib
import operator
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starsql.db import live  # noqa: E402
from starsql.db.dialects import DialectError, translate  # noqa: E402
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

# fixture file -> the dialect it is written in; the *_schema dumps hold no rows. The _inserts and
# _compact ones are the tools' other row formats: pg_dump --column-inserts --rows-per-insert=2, and
# mysqldump --compact --skip-extended-insert --complete-insert --routines.
DUMPS = {
    "shop.pg_dump.sql": "postgres", "shop.pg_dump_schema.sql": "postgres", "shop.pg_dump_inserts.sql": "postgres",
    "shop.mysqldump.sql": "mysql", "shop.mysqldump_schema.sql": "mysql", "shop.mysqldump_compact.sql": "mysql",
    "shop.sqlite_dump.sql": "sqlite", "shop.sqlite_schema.sql": "sqlite",
}


# -- making the dumps with the real tools ------------------------------------------------------

def postgres_dumps(url: str) -> dict[str, str]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((FIXTURES / "shop_postgres.sql").read_text())
    return {"shop.pg_dump.sql": servers.dump_postgres(url),
            "shop.pg_dump_schema.sql": servers.dump_postgres(url, schema_only=True),
            "shop.pg_dump_inserts.sql": servers.dump_postgres(
                url, extra_args=("--column-inserts", "--rows-per-insert=2"))}


def mariadb_dumps(url: str) -> dict[str, str]:
    import pymysql
    from pymysql.constants import CLIENT

    parts = urlsplit(url)
    conn = pymysql.connect(host=parts.hostname, port=parts.port, user=parts.username, password=parts.password,
                           database=parts.path.lstrip("/"), client_flag=CLIENT.MULTI_STATEMENTS, autocommit=True)
    with conn, conn.cursor() as cursor:
        cursor.execute((FIXTURES / "shop_mariadb.sql").read_text())
        while cursor.nextset():
            pass
    return {"shop.mysqldump.sql": servers.dump_mariadb(url),
            "shop.mysqldump_schema.sql": servers.dump_mariadb(url, no_data=True),
            "shop.mysqldump_compact.sql": servers.dump_mariadb(
                url, extra_args=("--compact", "--routines", "--skip-extended-insert", "--complete-insert"))}


SERVERS = {"postgres": (servers.postgres_available, servers.postgres_server, postgres_dumps),
           "mysql": (servers.mariadb_available, servers.mariadb_server, mariadb_dumps)}


@contextlib.contextmanager
def started_servers(dialects=tuple(SERVERS)):
    """{dialect: URL} of real servers, all started at once, for those whose binaries exist here."""
    wanted = [dialect for dialect in dialects if SERVERS[dialect][0]() is None]
    # A server dies with the thread that started it (tests/servers.py), so the threads outlive the servers.
    with ThreadPoolExecutor(2) as pool, contextlib.ExitStack() as stack:
        starts = [pool.submit(lambda d=dialect: stack.enter_context(SERVERS[d][1]())) for dialect in wanted]
        wait(starts)  # every start done before any error is raised, so the stack stops each one started
        yield {dialect: start.result() for dialect, start in zip(wanted, starts)}


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
    compact = parse_dump(read_fixture("shop.mysqldump_compact.sql"), "mysql").skipped
    procedure = [e for e in compact if "PROCEDURE" in e.words]  # a body with ';' inside, one statement
    assert len(procedure) == 1 and procedure[0].reason == "code or server objects, not tables"


def test_views_keep_their_query_with_the_names_the_tables_have():
    for name in ("shop.pg_dump.sql", "shop.mysqldump.sql"):
        views = parse_dump(read_fixture(name), DUMPS[name]).views
        assert list(views) == ["sales"] and "public." not in views["sales"]
        assert "JOIN" in views["sales"] and "COUNT(" in views["sales"]


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


# -- other dialects, plain DDL ------------------------------------------------------------------------

SMALL_SCHEMA = """\
CREATE TABLE people (id INTEGER PRIMARY KEY, name VARCHAR(100), born DATE, paid NUMERIC(8,2), active BOOLEAN);
CREATE TABLE visits (person_id INTEGER, at DATETIME, PRIMARY KEY (person_id, at), FOREIGN KEY (person_id) REFERENCES people(id));"""

SMALL_DDL = {
    "sqlite": "CREATE TABLE people (id INTEGER PRIMARY KEY, name VARCHAR(100), born DATE, paid NUMERIC(8, 2), "
              "active BOOLEAN);\nCREATE TABLE visits (person_id INTEGER REFERENCES people, at DATETIME, "
              "PRIMARY KEY (person_id, at));",
    "postgres": "CREATE TABLE public.people (id serial PRIMARY KEY, name character varying(100), born date, "
                "paid numeric(8,2), active boolean DEFAULT true);\nCREATE TABLE public.visits (person_id integer "
                "REFERENCES public.people(id), at timestamp with time zone DEFAULT now(), PRIMARY KEY (person_id, at));",
    "mysql": "CREATE TABLE `people` (`id` bigint unsigned NOT NULL AUTO_INCREMENT, `name` varchar(100), `born` date, "
             "`paid` decimal(8,2), `active` tinyint(1) DEFAULT 1, PRIMARY KEY (`id`)) ENGINE=InnoDB;\n"
             "CREATE TABLE `visits` (`person_id` bigint unsigned, `at` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP "
             "ON UPDATE CURRENT_TIMESTAMP, PRIMARY KEY (`person_id`, `at`), KEY `at` (`at`), "
             "CONSTRAINT `fk` FOREIGN KEY (`person_id`) REFERENCES `people` (`id`)) ENGINE=InnoDB;",
    "duckdb": "CREATE TABLE people (id HUGEINT PRIMARY KEY, name VARCHAR(100), born DATE, paid DECIMAL(8,2), "
              "active BOOL);\nCREATE TABLE visits (person_id INTEGER REFERENCES people (id), at TIMESTAMPTZ, "
              "PRIMARY KEY (person_id, at));",
    "tsql": "SET ANSI_NULLS ON\nGO\nCREATE TABLE [dbo].[people] ([id] [int] IDENTITY(1,1) NOT NULL, [name] "
            "[nvarchar](100) NULL, [born] [date], [paid] [decimal](8, 2), [active] [bit], CONSTRAINT [PK_people] "
            "PRIMARY KEY CLUSTERED ([id] ASC)) ON [PRIMARY]\nGO\nCREATE TABLE [dbo].[visits] ([person_id] [int], "
            "[at] [datetime2](7), PRIMARY KEY ([person_id], [at]), FOREIGN KEY ([person_id]) REFERENCES "
            "[dbo].[people] ([id]))\nGO",
    "snowflake": "create or replace TABLE DB.PUBLIC.people (id NUMBER(38,0) autoincrement start 1 increment 1, name "
                 "VARCHAR(100), born DATE, paid NUMBER(8,2), active BOOLEAN, primary key (id));\ncreate or replace "
                 "TABLE DB.PUBLIC.visits (person_id INT, at TIMESTAMP_NTZ(9), primary key (person_id, at), "
                 "foreign key (person_id) references DB.PUBLIC.people(id));",
    "bigquery": "CREATE TABLE `proj.shop.people` (id INT64 NOT NULL, name STRING(100), born DATE, paid NUMERIC(8, 2), "
                "active BOOL, PRIMARY KEY (id) NOT ENFORCED);\nCREATE TABLE `proj.shop.visits` (person_id INT64, "
                "at DATETIME, PRIMARY KEY (person_id, at) NOT ENFORCED, FOREIGN KEY (person_id) REFERENCES "
                "`proj.shop.people`(id) NOT ENFORCED);",
}


@pytest.mark.parametrize("dialect", SMALL_DDL)
def test_one_schema_in_every_dialect_gives_one_prompt_text(dialect):
    dump = parse_dump(SMALL_DDL[dialect], dialect)
    rendered = render_schema(dump.tables)
    if dialect == "snowflake":  # Snowflake's NUMBER(38,0) is its integer, written with its precision;
        # Snowflake stores unquoted names in upper case (its GET_DDL and catalog spell them so)
        rendered = rendered.replace("ID NUMERIC(38,0)", "ID INTEGER")
    if dialect == "duckdb":  # DuckDB ignores VARCHAR lengths, and so does sqlglot's reading of them
        rendered = rendered.replace("name TEXT", "name VARCHAR(100)")
    assert rendered == (SMALL_SCHEMA.upper() if dialect == "snowflake" else SMALL_SCHEMA)


def test_plain_sqlite_ddl_views_and_rows():
    text = """
        -- a comment above the statement
        CREATE TABLE b (x, y TEXT, PRIMARY KEY (x));
        CREATE TABLE a (id INTEGER PRIMARY KEY, b_id REFERENCES b, n INT);
        INSERT INTO a VALUES (1, 'k', -2), (2, NULL, 3.5e1);
        INSERT INTO a (n, id) VALUES (7, 3);
        INSERT INTO b VALUES ('k', replace('one\\ntwo', '\\n', char(10)));
        CREATE VIEW both_ AS SELECT a.*, b.y AS why FROM a JOIN b ON a.b_id = b.x;
        CREATE VIEW lost AS SELECT * FROM not_in_this_dump;
        CREATE VIRTUAL TABLE docs USING fts5(title, body, tokenize = 'porter');
        CREATE TABLE sqlite_stat1(tbl, idx, stat);
        PRAGMA foreign_keys = ON;
    """
    dump = parse_dump(text, "sqlite")
    assert render_schema(dump.tables) == (
        "CREATE TABLE b (x TEXT PRIMARY KEY, y TEXT);\n"
        "CREATE TABLE a (id INTEGER PRIMARY KEY, b_id TEXT, n INTEGER, FOREIGN KEY (b_id) REFERENCES b(x));\n"
        "CREATE TABLE both_ (id INTEGER, b_id TEXT, n INTEGER, why TEXT);\n"
        "CREATE TABLE docs (title TEXT, body TEXT);")
    assert dump.rows == {"a": [(1, "k", -2), (2, None, 35.0), (3, None, 7)], "b": [("k", "one\ntwo")]}
    skipped = {entry.words.split()[2]: (entry.line, entry.reason) for entry in dump.skipped if entry.words.startswith("CREATE")}
    assert skipped["lost"][0] == 9 and "cannot be told" in skipped["lost"][1]
    assert skipped["sqlite_stat1(tbl,"] == (11, "SQLite's own table")


def test_postgres_details():
    text = (
        "\\connect shop\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SELECT 1; $body$;\n"
        "CREATE DOMAIN public.money_amount AS numeric(12,2) CHECK (VALUE >= 0);\n"
        "CREATE TABLE public.m (id bigint GENERATED BY DEFAULT AS IDENTITY, at date, amount public.money_amount, "
        "raw bytea, tags text[]) PARTITION BY RANGE (at);\n"
        "CREATE TABLE public.\"Audit\" (\"Note\" text) INHERITS (public.m);\n"
        "CREATE MATERIALIZED VIEW public.monthly AS SELECT \"Note\", count(*) AS n FROM public.\"Audit\" "
        "GROUP BY 1 WITH NO DATA;\n"
        "CREATE TABLE public.m_2024 PARTITION OF public.m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');\n"
        "COPY public.m_2024 (id, at, amount, raw, tags) FROM stdin;\n"
        "1\t2024-05-01\t9.99\t\\\\x00ff\t{a,\"b c\"}\n"
        "2\t2024-06-01\t\\N\t\\N\ttab\\there\n"
        "\\.\n"
        "INSERT INTO public.m OVERRIDING SYSTEM VALUE VALUES (3, '2024-07-01'::date, 1, '\\x01'::bytea, NULL);\n")
    dump = parse_dump(text, "postgres")
    assert render_schema(dump.tables) == (
        "CREATE TABLE m (id INTEGER, at DATE, amount NUMERIC(12,2), raw BLOB, tags TEXT);\n"
        "CREATE TABLE Audit (id INTEGER, at DATE, amount NUMERIC(12,2), raw BLOB, tags TEXT, Note TEXT);\n"
        "CREATE TABLE monthly (Note TEXT, n INTEGER);")
    assert dump.rows["m"] == [(1, "2024-05-01", 9.99, b"\x00\xff", '{a,"b c"}'), (2, "2024-06-01", None, None, "tab\there"),
                              (3, "2024-07-01", 1, b"\x01", None)]
    assert [(e.line, e.reason.split(":")[0]) for e in dump.skipped] == [
        (1, "a psql command"), (2, "code or server objects, not tables"), (3, "the domain money_amount"),
        (7, "a partition of m")]


# Hand-written PostgreSQL DDL, names unquoted in mixed case (which PostgreSQL folds to lower case) and
# quoted (which keep their case), used in keys, a view, INSERT column lists, ALTER TABLE and COPY.
MIXED_CASE_DDL = """\
CREATE TABLE Singers (Singer_ID integer PRIMARY KEY, Name text, "Country" text);
CREATE TABLE "Concert" ("Concert_ID" integer, Singer_ID integer, PRIMARY KEY ("Concert_ID"),
    FOREIGN KEY (Singer_ID) REFERENCES Singers (Singer_ID));
ALTER TABLE "Concert" ADD COLUMN Year_Held integer;
CREATE TABLE Tours (Tour_Name text) PARTITION BY LIST (Tour_Name);
CREATE TABLE Tours_2014 PARTITION OF Tours FOR VALUES IN ('Spring');
CREATE VIEW Singer_Homes AS SELECT Name, "Country" AS Home FROM Singers;
INSERT INTO SINGERS (Singer_ID, NAME, "Country") VALUES (1, 'Ann', 'France'), (2, 'Bob', 'Peru');
INSERT INTO "Concert" VALUES (10, 1, 2014), (11, 2, 2015);
COPY public.TOURS_2014 (Tour_Name) FROM stdin;
Spring
\\.
"""
MIXED_CASE_SCHEMA = """\
CREATE TABLE singers (singer_id INTEGER PRIMARY KEY, name TEXT, Country TEXT);
CREATE TABLE Concert (Concert_ID INTEGER PRIMARY KEY, singer_id INTEGER, year_held INTEGER, FOREIGN KEY (singer_id) REFERENCES singers(singer_id));
CREATE TABLE tours (tour_name TEXT);
CREATE TABLE singer_homes (name TEXT, home TEXT);"""


@pytest.mark.parametrize("dialect, fold", [("postgres", str.lower), ("snowflake", str.upper), ("duckdb", None),
                                           ("mysql", None), ("tsql", None), ("bigquery", None), ("sqlite", None)])
def test_unquoted_names_are_spelled_as_the_server_stores_them(dialect, fold):
    """PostgreSQL folds unquoted names to lower case, Snowflake to upper case; quoted names keep their
    case. The other servers keep names as written (DuckDB compares them ignoring case)."""
    text = "CREATE TABLE Singers (Singer_ID int PRIMARY KEY, \"Country\" text);\n" \
           "CREATE TABLE Concert (Singer_ID int REFERENCES Singers (Singer_ID));\n" \
           "CREATE VIEW Homes AS SELECT \"Country\" AS Home FROM Singers;\n" \
           "INSERT INTO Singers VALUES (1, 'France');\n"
    if dialect in ("mysql", "bigquery"):
        text = text.replace('"', "`")
    dump = parse_dump(text, dialect)
    spelled = fold or (lambda name: name)
    assert [(t.name, t.column_names(), t.primary_key) for t in dump.tables] == [
        (spelled("Singers"), [spelled("Singer_ID"), "Country"], [spelled("Singer_ID")]),
        (spelled("Concert"), [spelled("Singer_ID")], []), (spelled("Homes"), [spelled("Home")], [])]
    key = dump.tables[1].foreign_keys[0]
    assert (key.columns, key.ref_table, key.ref_columns) == ([spelled("Singer_ID")], spelled("Singers"), [spelled("Singer_ID")])
    assert list(dump.rows) == [spelled("Singers")] and list(dump.views) == [spelled("Homes")]


def test_mixed_case_postgres_ddl_reads_with_folded_names():
    dump = parse_dump(MIXED_CASE_DDL, "postgres")
    assert render_schema(dump.tables) == MIXED_CASE_SCHEMA
    assert dump.rows == {"singers": [(1, "Ann", "France"), (2, "Bob", "Peru")],
                         "Concert": [(10, 1, 2014), (11, 2, 2015)], "tours": [("Spring",)]}
    assert dump.views == {"singer_homes": 'SELECT name, "Country" AS home FROM singers'}


def test_mysql_details():
    text = (
        "/*!40101 SET NAMES utf8mb4 */;\n"
        "DELIMITER ;;\n"
        "CREATE PROCEDURE p() BEGIN SELECT 1; SELECT 2; END ;;\n"
        "DELIMITER ;\n"
        "# a MySQL comment\n"
        "CREATE TABLE `t` (`id` int(10) unsigned NOT NULL AUTO_INCREMENT, `y` year(4), `flag` tinyint(1), "
        "`e` enum('a','b'), `s` set('x','y'), `body` mediumtext, FULLTEXT KEY `ft` (`body`), UNIQUE KEY `u` (`y`), "
        "PRIMARY KEY (`id`)) ENGINE=MyISAM AUTO_INCREMENT=3 DEFAULT CHARSET=utf8mb4 COMMENT='it''s';\n"
        "INSERT IGNORE INTO `t` VALUES (1,1999,1,'a','x,y','line\\nbreak \\'q\\' \\\\ \\0 \\Z'),(2,NULL,0,'b','',x'41');\n"
        "REPLACE INTO `t` (`id`, `body`) VALUES (3, _utf8mb4'z');\n")
    dump = parse_dump(text, "mysql")
    assert render_schema(dump.tables) == (
        "CREATE TABLE t (id INTEGER PRIMARY KEY, y INTEGER, flag BOOLEAN, e TEXT, s TEXT, body TEXT);")
    assert dump.rows["t"] == [(1, 1999, 1, "a", "x,y", "line\nbreak 'q' \\ \x00 \x1a"), (2, None, 0, "b", "", b"A"),
                              (3, None, None, None, None, "z")]
    assert [(e.line, e.reason) for e in dump.skipped][:3] == [
        (1, "a session setting"), (2, "a mysql client command"), (3, "code or server objects, not tables")]


PHPMYADMIN = """-- phpMyAdmin SQL Dump
SET SQL_MODE = "NO_AUTO_VALUE_ON_ZERO";
START TRANSACTION;
CREATE TABLE `users` (
  `id` int(11) NOT NULL,
  `email` varchar(255) COLLATE utf8mb4_unicode_ci NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
INSERT INTO `users` (`id`, `email`) VALUES
(1, 'a@b.c'),
(2, 'x@y.z');
CREATE TABLE `posts` (`id` int(11) NOT NULL, `user_id` int(11) NOT NULL);
ALTER TABLE `users`
  ADD PRIMARY KEY (`id`),
  ADD UNIQUE KEY `users_email_unique` (`email`);
ALTER TABLE `posts`
  ADD PRIMARY KEY (`id`),
  ADD KEY `posts_user_id_foreign` (`user_id`);
ALTER TABLE `users`
  MODIFY `id` int(11) NOT NULL AUTO_INCREMENT, AUTO_INCREMENT=3;
ALTER TABLE `posts`
  ADD CONSTRAINT `posts_user_id_foreign` FOREIGN KEY (`user_id`) REFERENCES `users` (`id`) ON DELETE CASCADE;
COMMIT;
"""

SSMS = """USE [shop]
GO
/****** Object:  Table [dbo].[users]    Script Date: 1/1/2024 ******/
SET ANSI_NULLS ON
GO
CREATE TABLE [dbo].[users](
\t[id] [int] IDENTITY(1,1) NOT NULL,
\t[email] [nvarchar](255) NOT NULL,
 CONSTRAINT [PK_users] PRIMARY KEY CLUSTERED
(
\t[id] ASC
)WITH (PAD_INDEX = OFF, STATISTICS_NORECOMPUTE = OFF, IGNORE_DUP_KEY = OFF) ON [PRIMARY]
) ON [PRIMARY] TEXTIMAGE_ON [PRIMARY]
GO
CREATE TABLE [dbo].[posts]([id] [int] NOT NULL PRIMARY KEY, [user_id] [int] NOT NULL)
GO
ALTER TABLE [dbo].[users] ADD  CONSTRAINT [DF_users_email]  DEFAULT (N'') FOR [email]
GO
ALTER TABLE [dbo].[posts]  WITH CHECK ADD  CONSTRAINT [FK_posts_users] FOREIGN KEY([user_id])
REFERENCES [dbo].[users] ([id])
GO
SET IDENTITY_INSERT [dbo].[users] ON
GO
INSERT [dbo].[users] ([id], [email]) VALUES (1, N'a@b.c')
GO
INSERT [dbo].[users] ([id], [email]) VALUES (2, N'x@y.z')
GO
"""


@pytest.mark.parametrize("text, dialect", [(PHPMYADMIN, "mysql"), (SSMS, "tsql")], ids=["phpmyadmin", "ssms"])
def test_exports_of_other_tools(text, dialect):
    """phpMyAdmin's keys added afterwards by ALTER TABLE; SQL Server Management Studio's GO batches."""
    dump = parse_dump(text, dialect)
    assert render_schema(dump.tables) == (
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(255));\n"
        "CREATE TABLE posts (id INTEGER PRIMARY KEY, user_id INTEGER, FOREIGN KEY (user_id) REFERENCES users(id));")
    assert dump.rows == {"users": [(1, "a@b.c"), (2, "x@y.z")]}


def test_spider_databases_read_as_sqlite_itself_sees_them(spider_dir):
    """Every Spider dev database's .schema and .dump (Python's): the tables, columns and keys SQLite
    reports (starsql.schema.sqlite_tables), and all its rows."""
    from starsql.schema import sqlite_tables

    def keys(tables):
        return sorted((t.name, t.column_names(), t.primary_key,
                       [(k.columns, k.ref_table.lower(), k.ref_columns) for k in t.foreign_keys]) for t in tables)

    paths = sorted(spider_dir.glob("database/*/*.sqlite"))
    assert len(paths) >= 19
    for path in paths:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            schema = "".join(sql + ";\n" for (sql,) in conn.execute("SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL"))
            full = "\n".join(conn.iterdump())
            expected = sqlite_tables(conn)
            row_count = sum(conn.execute(f'SELECT count(*) FROM "{t.name}"').fetchone()[0] for t in expected if not t.view)
        assert keys(parse_dump(schema, "sqlite").tables) == keys(expected), path.name
        dump = parse_dump(full, "sqlite")
        assert keys(dump.tables) == keys(expected), path.name
        assert sum(len(rows) for rows in dump.rows.values()) == row_count, path.name


# -- problems: all at once, each where it is ---------------------------------------------------------

def test_problems_are_reported_all_at_once_with_line_and_first_words():
    text = (
        "CREATE TABLE a (id INTEGER PRIMARY KEY);\n"
        "-- the comment above is not what is quoted\n"
        "CREATE TABLE b (id INTEGER,\n  x DEFAULT (((;\n"   # line 3: sqlglot cannot read it
        "INSERT INTO nowhere VALUES (1);\n"                  # line 5: no such table
        "INSERT INTO a VALUES (1, 2);\n"                     # line 6: too many values
        "CREATE TABLE a (id INTEGER);\n")                    # line 7: created twice
    with pytest.raises(DumpError) as caught:
        parse_dump(text, "sqlite")
    problems = caught.value.problems
    assert [p.split(" (`")[0] for p in problems] == ["line 3", "line 5", "line 6", "line 7"]
    assert problems[0].startswith("line 3 (`CREATE TABLE b (id INTEGER, x DEFAULT (((`): sqlite cannot read it")
    assert "`nowhere`" in problems[1] and "CREATE TABLE first" in problems[1]
    assert "2 values for 1 column of `a`" in problems[2]
    assert "created twice (first on line 1)" in problems[3]
    assert all(problem in str(caught.value) for problem in problems)


@pytest.mark.parametrize("text, dialect, expected", [
    ("CREATE TABLE t (a int);\n\nCREATE TABLE u (b\x00 int);", "sqlite", "line 3: a NUL character"),
    ("CREATE TABLE t (a int);\n\ud800", "sqlite", "line 2: an invalid character (U+D800"),
    ("CREATE TABLE t (a int);\nCREATE VIEW v AS SELECT " + "(" * 5000 + "a" + ")" * 5000 + " FROM t;", "sqlite",
     "line 2 (`CREATE VIEW v AS SELECT ((((((((((((((((((((((((((((((((((...`): nested too deeply"[:30]),
    ("CREATE TABLE t (" + ", ".join(f"c{i} int" for i in range(30000)) + ");", "postgres",
     "more than the 200,000 a statement may have; split it"),
    ("CREATE TABLE t (a int);\nINSERT INTO t VALUES ('abc);\n", "sqlite", "line 2 (`'abc);`): the ' quote opened here is never closed"),
    ("CREATE TABLE t (a int);\n/* no end\nCREATE TABLE u (b int);", "mysql", "line 2 (`/* no end CREATE TABLE u (b int);`): the comment"),
    (b"CREATE TABLE t (a int)", "sqlite", "must be text (a string), not bytes"),
    ("CREATE TABLE `t` (`a` int) ENGINE=InnoDB;", "postgres", "choose the dialect mysql"),
    ("CREATE TABLE t (a int);\nINSERT INTO t VALUES (now());", "postgres", "the value `CURRENT_TIMESTAMP` is not a constant"),
], ids=["nul", "surrogate", "deep", "huge", "quote", "comment", "bytes", "dialect", "not-constant"])
def test_bad_input_gets_a_clear_error(text, dialect, expected):
    with pytest.raises(DumpError) as caught:
        parse_dump(text, dialect)
    assert expected in str(caught.value)


def test_a_failed_create_table_is_reported_once_not_again_for_each_insert():
    text = "CREATE TABLE t (a int, b DEFAULT ((;\n" + "INSERT INTO t VALUES (1, 2);\n" * 50
    with pytest.raises(DumpError) as caught:
        parse_dump(text, "sqlite")
    assert len(caught.value.problems) == 1 and caught.value.problems[0].startswith("line 1 (`CREATE TABLE t")


def test_mysqldump_in_ansi_mode_says_to_dump_without_it():
    text = ("/*!40101 SET @OLD_SQL_MODE=@@SQL_MODE, SQL_MODE='NO_AUTO_VALUE_ON_ZERO,ANSI' */;\n"
            'CREATE TABLE "t" ("a" int(11) NOT NULL, "b" varchar(5), PRIMARY KEY ("a"), KEY "b" ("b"));\n')
    with pytest.raises(DumpError) as caught:
        parse_dump(text, "mysql")
    assert caught.value.problems[0].startswith("line 1 (`SQL_MODE='NO_AUTO_VALUE_ON_ZERO,ANSI`): the dump sets SQL_MODE ANSI")
    assert "dump again without --compatible" in caught.value.problems[0]


def test_unknown_dialect_names_the_valid_ones():
    with pytest.raises(DialectError, match="choose one of sqlite, postgres, mysql"):
        parse_dump("CREATE TABLE t (a int);", "oracle")


def test_too_large_a_dump_is_refused_before_reading(monkeypatch):
    from starsql.db import dumps

    monkeypatch.setattr(dumps, "MAX_DUMP_CHARS", 1000)
    with pytest.raises(DumpError, match="more than 1,000; dump the schema with fewer rows"):
        parse_dump("CREATE TABLE t (a int);\n" + "INSERT INTO t VALUES (1);\n" * 100, "sqlite")


# -- big dumps --------------------------------------------------------------------------------------

def test_big_dumps_read_their_rows_without_sqlglot_per_row(monkeypatch):
    """Thousands of rows, as each tool writes them: sqlglot reads each distinct statement head once."""
    from starsql.db import dumps

    calls = []
    parse = dumps.sqlglot.parse
    monkeypatch.setattr(dumps.sqlglot, "parse", lambda *a, **k: calls.append(1) or parse(*a, **k))
    n = 10_000
    values = [f"({i},'O\\'Brien; -- {i}',{i / 4},NULL)" for i in range(n)]
    mysql = "CREATE TABLE `t` (`id` int, `name` text, `x` double, `n` int);\n" + "".join(
        "INSERT INTO `t` VALUES " + ",".join(values[k:k + 1000]) + ";\n" for k in range(0, n, 1000))
    postgres = ("CREATE TABLE public.t (id integer, name text, x double precision, n integer);\n"
                "COPY public.t (id, name, x, n) FROM stdin;\n"
                + "".join(f"{i}\tO'Brien; -- {i}\t{i / 4}\t\\N\n" for i in range(n)) + "\\.\n")
    sqlite = "CREATE TABLE t (id INTEGER, name TEXT, x REAL, n INTEGER);\n" + "".join(
        f"INSERT INTO t VALUES({i},'O''Brien; -- {i}',{i / 4},NULL);\n" for i in range(n))
    for text, dialect in ((mysql, "mysql"), (postgres, "postgres"), (sqlite, "sqlite")):
        calls.clear()
        started = time.monotonic()
        rows = parse_dump(text, dialect).rows["t"]
        assert len(rows) == n and rows[n - 1] == (n - 1, f"O'Brien; -- {n - 1}", (n - 1) / 4, None), dialect
        assert len(calls) <= 3, dialect
        assert time.monotonic() - started < 30, dialect  # a backstop: about a second on a shared 2-core machine


# -- live servers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server_urls():
    """{dialect: URL} of the real servers this module shares, where the binaries exist."""
    with started_servers() as urls:
        yield urls


@pytest.fixture(scope="module")
def live_dumps(server_urls, tmp_path_factory):
    """Fresh dumps from real servers, where the binaries exist (each part skips on its own)."""
    made = sqlite_dumps(tmp_path_factory.mktemp("sqlite"))
    for dialect, url in server_urls.items():
        made.update(SERVERS[dialect][2](url))
    return made


@pytest.mark.parametrize("name", DUMPS)
def test_live_dumps_read_as_the_fixtures_do(live_dumps, name):
    if name not in live_dumps:
        reason = servers.postgres_available() if DUMPS[name] == "postgres" else servers.mariadb_available()
        pytest.skip(f"cannot make {name} here: {reason}")
    assert_shop(parse_dump(live_dumps[name], DUMPS[name]), with_rows="schema" not in name)


def test_mixed_case_names_are_the_real_servers_and_translated_sql_runs_there(server_urls):
    """The hand-written DDL's names are those PostgreSQL reports for it, and SQLite SQL translated with
    that schema runs there: `Singers` in the model's SQL is `singers` on the server, `"Concert"` stays quoted."""
    import psycopg

    if "postgres" not in server_urls:
        pytest.skip(f"no PostgreSQL server here: {servers.postgres_available()}")
    with psycopg.connect(server_urls["postgres"], autocommit=True) as conn:  # a database of its own
        conn.execute("CREATE DATABASE mixed_case")
    url = server_urls["postgres"].rsplit("/", 1)[0] + "/mixed_case"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(MIXED_CASE_DDL.split("COPY")[0] + "INSERT INTO Tours VALUES ('Spring');")
    database = live.connect(url)
    try:
        by_name = operator.attrgetter("name")
        tables = parse_dump(MIXED_CASE_DDL, "postgres").tables
        reported = [t for t in database.tables() if t.name != "tours_2014"]  # a partition: its rows are the parent's
        assert render_schema(sorted(reported, key=by_name)) == render_schema(sorted(tables, key=by_name))
        sql = translate("SELECT Singers.Name, Concert.Year_Held, Singers.Country FROM Singers JOIN Concert "
                        "ON Singers.Singer_ID = Concert.Singer_ID WHERE Concert.Concert_ID IN "
                        "(SELECT Concert_ID FROM Concert WHERE Year_Held > 2014) "
                        "UNION SELECT Home, 0, Name FROM Singer_Homes WHERE Home LIKE 'fr%' ORDER BY 2",
                        "postgres", schema=tables)
        with psycopg.connect(url) as conn:
            assert conn.execute(sql).fetchall() == [("France", 0, "Ann"), ("Bob", 2015, "Peru")], sql
    finally:
        live.close_all()  # its connections would keep the server from stopping


# Rows whose INSERT omits columns: each such column gets its DEFAULT, and a serial/identity one its number.
DEFAULTS_DDL = {
    "postgres": "CREATE TABLE defaults_t (id serial, n integer GENERATED BY DEFAULT AS IDENTITY, a integer DEFAULT 5, "
                "b text, c text DEFAULT 'x', d integer DEFAULT -3, e timestamp DEFAULT now());",
    "mysql": "CREATE TABLE defaults_t (id int NOT NULL AUTO_INCREMENT, n int DEFAULT NULL, a int DEFAULT 5, b text, "
             "c varchar(5) DEFAULT 'x', d int DEFAULT -3, e timestamp NULL DEFAULT current_timestamp(), PRIMARY KEY (id));",
}
DEFAULTS_ROWS = "INSERT INTO defaults_t (b) VALUES ('z'), ('y'); INSERT INTO defaults_t (b, a, c) VALUES ('w', 1, NULL);"


def server_rows(dialect: str, url: str, sql: str) -> list[tuple]:
    if dialect == "postgres":
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql)
            return conn.execute("SELECT id, n, a, b, c, d FROM defaults_t ORDER BY id").fetchall()
    import pymysql

    parts = urlsplit(url)
    conn = pymysql.connect(host=parts.hostname, port=parts.port, user=parts.username, password=parts.password,
                           database=parts.path.lstrip("/"), autocommit=True)
    try:
        with conn.cursor() as cursor:
            for statement in filter(str.strip, sql.split(";")):
                cursor.execute(statement)
            cursor.execute("SELECT id, n, a, b, c, d FROM defaults_t ORDER BY id")
            return [tuple(row) for row in cursor.fetchall()]
    finally:
        conn.close()


@pytest.mark.parametrize("dialect", DEFAULTS_DDL)
def test_rows_that_omit_a_column_get_its_default_as_on_the_server(server_urls, dialect):
    dump = parse_dump(DEFAULTS_DDL[dialect] + "\n" + DEFAULTS_ROWS, dialect)
    rows = [row[:6] for row in dump.rows["defaults_t"]]  # e: now() is not a constant
    n = [1, 2, 3] if dialect == "postgres" else [None] * 3  # an identity column in PostgreSQL, a plain one in MySQL
    assert rows == [(1, n[0], 5, "z", "x", -3), (2, n[1], 5, "y", "x", -3), (3, n[2], 1, "w", None, -3)]
    assert all(row[6] is None for row in dump.rows["defaults_t"])
    assert [s.reason for s in dump.skipped] == ["the DEFAULT of `defaults_t`.`e` is not a constant: defaults not "
                                                "applied, rows that omit the column hold NULL there"]
    if dialect not in server_urls:
        pytest.skip(f"no {dialect} server here")
    assert server_rows(dialect, server_urls[dialect], DEFAULTS_DDL[dialect] + DEFAULTS_ROWS) == rows


if __name__ == "__main__":  # write the fixtures again from real servers
    import tempfile

    with tempfile.TemporaryDirectory() as directory, started_servers() as urls:
        made = {**sqlite_dumps(Path(directory)), **postgres_dumps(urls["postgres"]), **mariadb_dumps(urls["mysql"])}
    for file_name, text in made.items():
        (FIXTURES / file_name).write_text(text, encoding="utf-8")
        print("wrote", FIXTURES / file_name)
