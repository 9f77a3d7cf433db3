"""The schema check: SQL compiled in a throwaway SQLite database, writes never run, runaways stopped."""

import functools
import json
import sqlite3
import time

import pytest

from starsql.serve.check import (
    SchemaError,
    check_sql,
    format_sql,
    load_schema,
    looks_like_sql,
    statement_kind,
    unknown_identifiers,
)

SCHEMA = """
CREATE TABLE singer (singer_id INTEGER, name VARCHAR, country VARCHAR, age INTEGER);
CREATE TABLE concert (concert_id INTEGER, concert_name VARCHAR, year INTEGER);
CREATE TABLE singer_in_concert (concert_id INTEGER, singer_id INTEGER);
"""
ROWS = """
INSERT INTO singer VALUES (1, 'Joe Sharp', 'Netherlands', 52), (2, 'Justin Brown', 'France', 29), (3, 'Rose White', 'France', 41);
INSERT INTO concert VALUES (1, 'Auditions', 2014), (2, 'Week 1', 2015);
INSERT INTO singer_in_concert VALUES (1, 2), (2, 2), (2, 3);
"""
TABLES = {"singer": ["singer_id", "name", "country", "age"], "concert": ["concert_id", "concert_name", "year"],
          "singer_in_concert": ["concert_id", "singer_id"]}


def test_valid_sql_without_rows_is_compiled_not_run():
    result = check_sql("SELECT count(*) FROM singer WHERE country = 'France'", SCHEMA)
    assert result.valid and result.error is None
    assert result.unknown_identifiers == [] and not result.writes_data
    assert result.rows is None  # no example rows to run it on


def test_valid_select_runs_on_insert_rows():
    result = check_sql("SELECT name, age FROM singer WHERE country = 'France' ORDER BY age DESC", SCHEMA + ROWS)
    assert result.valid and result.error is None
    assert result.columns == ["name", "age"]
    assert result.rows == [["Rose White", 41], ["Justin Brown", 29]]
    json.dumps(result.to_dict())  # what the /sql API returns


def test_row_cap():
    result = check_sql("SELECT a.name FROM singer a, singer b, singer c", SCHEMA + ROWS, max_rows=5)
    assert len(result.rows) == 5 and result.truncated


def test_unknown_column_and_table_are_listed():
    result = check_sql("SELECT nickname FROM singer", SCHEMA)
    assert not result.valid and "no such column: nickname" in result.error
    assert result.unknown_identifiers == ["nickname"]

    result = check_sql("SELECT name FROM singers JOIN concert AS c ON c.concert_id = singers.id", SCHEMA)
    assert not result.valid and "no such table: singers" in result.error
    assert "singers" in result.unknown_identifiers

    result = check_sql("SELECT s.height, s.name FROM singer AS s", SCHEMA)
    assert result.unknown_identifiers == ["s.height"]


@pytest.mark.parametrize("sql", [
    # table aliases, output-column aliases
    "SELECT s.name, count(*) AS n FROM singer AS s JOIN singer_in_concert AS sic ON s.singer_id = sic.singer_id "
    "GROUP BY s.name ORDER BY n DESC",
    # CTE names and their columns
    "WITH per_country AS (SELECT country, count(*) AS cnt FROM singer GROUP BY country) "
    "SELECT country, cnt FROM per_country WHERE cnt > 1",
    "WITH RECURSIVE seq(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM seq WHERE x < 3) SELECT x FROM seq",
    # subquery aliases, correlated subqueries, nested IN
    "SELECT t.country FROM (SELECT country, avg(age) AS mean_age FROM singer GROUP BY country) AS t WHERE t.mean_age > 30",
    "SELECT name FROM singer AS s WHERE EXISTS (SELECT 1 FROM singer_in_concert AS x WHERE x.singer_id = s.singer_id)",
    "SELECT name FROM singer WHERE singer_id NOT IN (SELECT singer_id FROM singer_in_concert)",
    # double-quoted strings, which SQLite reads as strings when no column has that name
    'SELECT name FROM singer WHERE country = "France"',
    "SELECT rowid, * FROM singer",
    "SELECT T1.name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id = T2.singer_id "
    "JOIN concert AS T3 ON T2.concert_id = T3.concert_id WHERE T3.year = 2014",
])
def test_no_false_positives(sql):
    result = check_sql(sql, SCHEMA + ROWS)
    assert result.valid, result.error
    assert result.unknown_identifiers == []
    assert not result.writes_data


def test_unknown_identifiers_on_its_own():
    assert unknown_identifiers("SELECT x.name FROM singer AS s", TABLES) == ["x"]
    assert unknown_identifiers("SELECT zzz FROM concert", TABLES) == ["zzz"]
    assert unknown_identifiers("SELECT year FROM concert ORDER BY year", TABLES) == []
    assert unknown_identifiers("not sql at all (", TABLES) == []


def _singers(conn) -> list:
    return conn.execute("SELECT * FROM singer ORDER BY singer_id").fetchall()


@pytest.mark.parametrize("sql, kind", [
    ("DROP TABLE singer", "DROP"),
    ("UPDATE singer SET age = 0", "UPDATE"),
    ("DELETE FROM singer", "DELETE"),
    ("INSERT INTO singer VALUES (9, 'x', 'y', 1)", "INSERT"),
    ("ALTER TABLE singer ADD COLUMN height INTEGER", "ALTER"),
    ("CREATE TABLE t (x INTEGER)", "CREATE"),
])
def test_writes_are_flagged_and_not_executed(sql, kind, monkeypatch):
    # Keep the sandbox the check builds open, to look at its data afterwards.
    sandboxes = []

    class KeptOpen(sqlite3.Connection):
        def close(self):
            sandboxes.append(self)

    monkeypatch.setattr(sqlite3, "connect", functools.partial(sqlite3.connect, factory=KeptOpen))
    assert statement_kind(sql) == kind
    result = check_sql(sql, SCHEMA + ROWS)
    assert result.writes_data
    assert result.valid  # it compiles against the schema (EXPLAIN never executes)
    assert result.rows is None and "not run" in result.error
    (conn,) = sandboxes
    assert _singers(conn) == [(1, "Joe Sharp", "Netherlands", 52), (2, "Justin Brown", "France", 29),
                              (3, "Rose White", "France", 41)]  # still there, unchanged
    assert [r[1] for r in conn.execute("PRAGMA table_info(singer)")] == TABLES["singer"]
    assert "t" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}


def test_authorizer_is_the_second_guard(monkeypatch):
    # Even if the compiled program were taken for a read, SQLite's authorizer refuses to run a write.
    import starsql.serve.check as sqlcheck

    monkeypatch.setattr(sqlcheck, "classify", lambda conn, sql, budget: (None, False, True))
    result = check_sql("UPDATE singer SET age = 0", SCHEMA + ROWS)
    assert result.writes_data and result.rows is None and "not run" in result.error
    # And where a query runs, only reads are authorized.
    conn = load_schema(SCHEMA + ROWS)
    with pytest.raises(sqlite3.DatabaseError, match="not authorized|readonly"):
        sqlcheck._run(conn, "UPDATE singer SET age = 0", sqlcheck.Budget(1), max_rows=5)
    assert conn.execute("SELECT sum(age) FROM singer").fetchone() == (122,)


def test_attach_and_pragma_are_refused(tmp_path):
    target = tmp_path / "evil.db"
    for sql in (f"ATTACH DATABASE '{target}' AS evil", "PRAGMA foreign_keys = OFF"):
        result = check_sql(sql, SCHEMA + ROWS)
        assert not result.valid and result.writes_data and "not allowed" in result.error.lower()
    with pytest.raises(SchemaError, match="Not allowed here: ATTACH .* in the schema"):
        load_schema(f"ATTACH DATABASE '{target}' AS evil")
    assert not target.exists()


def test_several_statements_are_not_run():
    result = check_sql("SELECT 1; DROP TABLE singer", SCHEMA + ROWS)
    assert not result.valid and result.writes_data and "one SQL statement" in result.error


def test_malformed_schema_names_the_statement():
    schema = "CREATE TABLE a (x INTEGER);\nCREATE TABLE b (x INTEGER,, y);\nCREATE TABLE c (z INTEGER);"
    with pytest.raises(SchemaError) as raised:
        load_schema(schema)
    assert raised.value.index == 2 and "CREATE TABLE b" in raised.value.statement
    assert "statement 2" in str(raised.value) and "syntax error" in str(raised.value)
    result = check_sql("SELECT x FROM a", schema)
    assert not result.valid and "statement 2" in result.error and "CREATE TABLE b" in result.error


def test_runaway_query_is_stopped_by_the_time_limit():
    runaway = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    start = time.monotonic()
    result = check_sql(runaway, SCHEMA + ROWS, seconds=0.5)
    assert time.monotonic() - start < 5
    assert result.valid and result.rows is None
    assert "Stopped after 0.5 s" in result.error and "too long" in result.error


def test_runaway_schema_is_stopped_too():
    schema = ("CREATE TABLE t (x INTEGER);\n"
              "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) INSERT INTO t SELECT count(*) FROM c;")
    with pytest.raises(SchemaError, match="statement 2.*time limit"):
        load_schema(schema, seconds=0.5)


def test_empty_and_non_sql():
    assert check_sql("", SCHEMA).error == "No SQL to check."
    assert not looks_like_sql("The answer is 42.") and not looks_like_sql("")
    assert looks_like_sql("select 1") and looks_like_sql("WITH x AS (SELECT 1) SELECT * FROM x")
    assert statement_kind("hello world") is None


def test_format_sql_is_pretty_sqlite():
    assert format_sql("select name from singer where age>30") == "SELECT\n  name\nFROM singer\nWHERE\n  age > 30"
    assert format_sql("not ( sql") == "not ( sql"
