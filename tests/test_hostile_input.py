"""Hostile and malformed input for the SQL check: schemas and SQL built to take time, memory or
the process down, and text that SQLite, sqlglot or the tokenizer cannot take. Each gets a clear
message within the time limit. The same schemas go through the served app in tests/test_app.py
(HOSTILE_SCHEMAS), where its memory is measured too."""

import sqlite3
import time

import pytest

from starsql.sandbox import MAX_VALUE_BYTES, open_limited
from starsql.serve.check import TIME_LIMIT_S, SchemaError, check_sql, open_database

WALL_LIMIT_S = 3.0  # schema, check and run of one request together
SCHEMA = """CREATE TABLE singer (singer_id INTEGER, name VARCHAR, country VARCHAR, age INTEGER);
INSERT INTO singer VALUES (1, 'Joe Sharp', 'Netherlands', 52), (2, 'Justin Brown', 'France', 29);"""
T = "CREATE TABLE t (x INTEGER, y TEXT);\n"
REC = "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < {n}) "


def union_view_tree(levels: int, terms: int) -> str:
    """Each view a UNION ALL of `terms` copies of the one below: listing the top one expands terms**levels."""
    views = ["CREATE VIEW v0 AS " + " UNION ALL ".join(["SELECT 1 AS x"] * terms)]
    views += [f"CREATE VIEW v{i} AS " + " UNION ALL ".join([f"SELECT x FROM v{i - 1}"] * terms) for i in range(1, levels)]
    return T + ";\n".join(views) + ";"


def view_chain(length: int) -> str:
    return T + "".join(f"CREATE VIEW c{i} AS SELECT * FROM {f'c{i - 1}' if i else 't'} "
                       f"UNION ALL SELECT * FROM {f'c{i - 1}' if i else 't'};\n" for i in range(length))


# name -> (schema, what the message says; None: it loads)
HOSTILE_SCHEMAS = {
    "printf-precision-x2": (T + "INSERT INTO t VALUES (1, printf('%.*c', 2147483647, 'x')), "
                            "(2, printf('%.*c', 2147483647, 'y'));", None),
    "printf-precision-digits": (T + "INSERT INTO t VALUES (1, printf('%.2147483647c', 'x'));", None),
    "format-precision": (T + "INSERT INTO t VALUES (1, format('%.*c', 2147483647, 'x'));", None),
    "generated-column-printf": ("CREATE TABLE g (x INTEGER, y TEXT AS (printf('%.*c', x, 'z')));"
                                "INSERT INTO g (x) VALUES (2147483647);", None),
    "zeroblob-table": (T + "CREATE TABLE big AS " + REC.format(n=100_000) + "SELECT zeroblob(50000) AS b FROM r;", "16 MB"),
    "randomblob-table": (T + "CREATE TABLE big AS " + REC.format(n=100_000) + "SELECT randomblob(50000) AS b FROM r;", "16 MB"),
    "temp-table": (T + "CREATE TEMP TABLE big AS " + REC.format(n=100_000) + "SELECT zeroblob(50000) AS b FROM r;", "16 MB"),
    "zeroblob-gigabyte": (T + "INSERT INTO t VALUES (1, zeroblob(1000000000));", "exceeds 100,000 bytes"),
    "replace-growth": (T + "INSERT INTO t VALUES (1, replace(replace(printf('%.*c', 90000, 'a'), 'a', 'aaaa'), 'a', 'aa'));",
                       "exceeds 100,000 bytes"),
    "group-concat": (T + "INSERT INTO t " + REC.format(n=100_000) + "SELECT i, 'abcdefghij' FROM r;"
                     "INSERT INTO t SELECT 0, group_concat(y) FROM t;", "exceeds 100,000 bytes"),
    "index-over-big-table": (T + "INSERT INTO t " + REC.format(n=200_000) + "SELECT i, hex(randomblob(20)) FROM r;"
                             "CREATE INDEX ti ON t (y);", "16 MB"),
    "recursive-forever": (T + "INSERT INTO t WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) "
                          "SELECT count(*), 'a' FROM r;", "time limit"),
    "union-view-tree": (union_view_tree(12, 6), "cannot be read"),
    "view-chain-17": (view_chain(17), "cannot be read"),
    "view-chain-40": (view_chain(40), "cannot be read"),
    "deep-parentheses": (T + "INSERT INTO t VALUES (" + "(" * 300 + "1" + ")" * 300 + ", 'a');", "statement 2"),
    "json-deep": (T + "INSERT INTO t VALUES (1, json('" + "[" * 5000 + "]" * 5000 + "'));", "malformed JSON"),
    "trigger-loop": (T + "CREATE TRIGGER tr AFTER INSERT ON t WHEN new.x < 1000000 BEGIN "
                     "INSERT INTO t VALUES (new.x + 1, new.y); END; PRAGMA recursive_triggers = ON;", "PRAGMA recursive_triggers"),
    "attach": (T + "ATTACH DATABASE '/tmp/starsql-evil.db' AS evil;", "Not allowed here: ATTACH"),
    "pragma": (T + "PRAGMA writable_schema = ON;", "Not allowed here: PRAGMA writable_schema"),
    "load-extension": (T + "SELECT load_extension('/tmp/evil.so');", "load_extension() is not allowed"),
    "vacuum": (T + "VACUUM;", "Not allowed here"),
    "begin-without-commit": (T + "BEGIN; INSERT INTO t VALUES (1, 'a');", None),
    "semicolons": (T + ";" * 5000, None),
    "no-tables": ("SELECT 1;", "no tables"),
    "only-comments": ("-- nothing\n/* at all */", "no tables"),
    "unterminated-string": (T + "INSERT INTO t VALUES (1, 'abc", "unrecognized token"),
    "too-many-columns": ("CREATE TABLE wide (" + ", ".join(f"c{i}" for i in range(300)) + ");", "too many columns"),
    "fts5": ("CREATE VIRTUAL TABLE f USING fts5(body); INSERT INTO f VALUES ('hello');", None),
    "nul": (T + "INSERT INTO t VALUES (1, 'a\x00b');", "NUL character"),
    "lone-surrogate": (T + "INSERT INTO t VALUES (1, '\ud800');", "lone surrogate"),
}

# name -> (SQL, what the result says: an error's words, or "rows" when it runs)
HOSTILE_SQL = {
    "printf-precision-x3": ("SELECT printf('%.*c', 2147483647, 'x'), printf('%.*c', 2147483647, 'y'), "
                            "format('%.2147483647c', 'z') FROM singer", "rows"),
    "parentheses-60": ("SELECT " + "(" * 60 + "1" + ")" * 60 + " FROM singer", "rows"),
    "parentheses-300": ("SELECT " + "(" * 300 + "1" + ")" * 300, "parser stack overflow"),
    "nested-in-80": ("SELECT name FROM singer WHERE singer_id IN "
                     + "(SELECT singer_id FROM singer WHERE singer_id IN " * 80 + "(1)" + ")" * 80, "stack overflow"),
    "recursive-forever": ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
                          "ran too long"),
    "sort-millions": (REC.format(n=3_000_000) + "SELECT i FROM r ORDER BY random() LIMIT 1", "rows|ran too long"),
    "zeroblob": ("SELECT zeroblob(2000000000) FROM singer", "exceeds 100,000 bytes"),
    "group-concat": (REC.format(n=1_000_000) + "SELECT length(group_concat('abcdefghij')) FROM r", "exceeds 100,000 bytes"),
    "cross-join": ("SELECT * FROM singer a, singer b, singer c, singer d, singer e, singer f, singer g, singer h, singer i",
                   "rows"),
    "wide-rows": ("SELECT * FROM (" + REC.format(n=100) + "SELECT printf('%.*c', 90000, 'x') AS a, "
                  "printf('%.*c', 90000, 'y') AS b FROM r)", "rows"),
    "glob": ("SELECT printf('%.*c', 99000, 'a') GLOB '*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b' FROM singer", "rows"),
    "like": ("SELECT printf('%.*c', 99000, 'a') LIKE '%a%a%a%a%a%a%a%a%a%a%a%a%a%a%a%a%a%a%a%b' FROM singer", "rows"),
    "json-deep": ("SELECT json('" + "[" * 3000 + "]" * 3000 + "') FROM singer", "malformed JSON"),
    "many-arguments": ("SELECT max(" + ",".join(["1"] * 500) + ")", "too many arguments"),
    "long-sql": ("SELECT " + " + ".join(["1"] * 20_000), "at most 20,000"),
    "reindex": ("REINDEX", "would change the database"),
    "reindex-table": ("REINDEX singer", "would change the database"),
    "analyze": ("ANALYZE", "would change the database"),
    "vacuum": ("VACUUM", "would change the database"),
    "begin": ("BEGIN", "would change the database"),
    "savepoint": ("SAVEPOINT a", "would change the database"),
    "insert-returning": ("INSERT INTO singer VALUES (9, 'x', 'y', 1) RETURNING *", "would change the database"),
    "with-delete": ("WITH a AS (SELECT 1) DELETE FROM singer", "would change the database"),
    "temp-table": ("CREATE TEMP TABLE x AS SELECT 1", "would change the database"),
    "update-sqlite-master": ("UPDATE sqlite_master SET sql = ''", "may not be modified"),
    "attach": ("ATTACH DATABASE '/tmp/starsql-evil.db' AS evil", "Not allowed here: ATTACH"),
    "detach": ("DETACH DATABASE main", "Not allowed here: DETACH"),
    "pragma": ("PRAGMA writable_schema = ON", "Not allowed here: PRAGMA writable_schema"),
    "load-extension": ("SELECT load_extension('/tmp/evil.so')", "load_extension() is not allowed"),
    "pragma-function": ("SELECT name FROM pragma_table_info('singer')", "rows"),
    "two-statements": ("SELECT 1; DROP TABLE singer", "one SQL statement"),
    "explain": ("EXPLAIN SELECT 1", "syntax error"),
    "nul": ("SELECT 1\x00", "NUL character"),
    "lone-surrogate": ("SELECT '\udc00'", "lone surrogate"),
    "not-a-string": (42, "must be text"),
    "none": (None, "must be text"),
    "comment-only": ("-- nothing", "incomplete input"),
    "semicolons": (";;;;", "No SQL to check"),
    "unicode": ("SELECT '日本語 🎉 \u202e'", "rows"),
}


def _timed(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    elapsed = time.monotonic() - start
    assert elapsed < WALL_LIMIT_S, f"took {elapsed:.2f} s"
    return result


@pytest.mark.parametrize("name", HOSTILE_SCHEMAS)
def test_hostile_schema_gets_a_clear_message_in_time(name):
    schema, expected = HOSTILE_SCHEMAS[name]
    result = _timed(check_sql, "SELECT 1", schema)
    if expected in (None, "no tables"):  # a schema without tables loads; the app says it has none
        assert result.valid, result.error
    else:
        assert not result.valid and expected in result.error, result.error
        assert "Traceback" not in result.error


@pytest.mark.parametrize("name", HOSTILE_SQL)
def test_hostile_sql_gets_a_clear_result_in_time(name):
    sql, expected = HOSTILE_SQL[name]
    result = _timed(check_sql, sql, SCHEMA)
    if "rows" in expected.split("|") and result.rows is not None:
        assert result.valid and not result.writes_data and result.error is None
    else:
        assert result.error and any(e in result.error for e in expected.split("|")), result.error
    assert result.rows is None or len(result.rows) <= 50


def test_one_budget_for_the_whole_request():
    # Loading a slow schema spends the budget that the check then has left: not 2 s each.
    schema = T + ("INSERT INTO t " + REC.format(n=10**9) + "SELECT count(*), 'a' FROM r WHERE i < 0;\n") * 3
    start = time.monotonic()
    with pytest.raises(SchemaError, match="time limit"):
        open_database(schema)
    assert time.monotonic() - start < TIME_LIMIT_S + 0.5


def test_printf_is_capped_not_slow():
    conn = open_limited()
    start = time.monotonic()
    row = conn.execute("SELECT printf('%.*c', 2147483647, 'x'), printf('%5.2f|%-3d|%s|%%', 3.14159, 7, 'a'), "
                       "format('%.*c', 3, 'y'), printf('%*d', 4, 1)").fetchone()
    assert time.monotonic() - start < 0.5  # SQLite's own printf spends seconds here, uninterruptibly
    assert row == (None, " 3.14|7  |a|%", "yyy", "   1")
    with pytest.raises(sqlite3.DataError):
        conn.execute("SELECT zeroblob(?)", (MAX_VALUE_BYTES + 1,)).fetchone()


def test_statements_are_classified_by_sqlite_not_by_keywords():
    reindex = check_sql("REINDEX", SCHEMA)
    assert reindex.valid and reindex.writes_data and reindex.rows is None  # never run
    pragma_function = check_sql("SELECT name FROM pragma_table_info('singer')", SCHEMA)
    assert not pragma_function.writes_data and [r[0] for r in pragma_function.rows] == ["singer_id", "name", "country", "age"]
    extension = check_sql("SELECT load_extension('/tmp/evil.so')", SCHEMA)
    assert not extension.writes_data and not extension.valid and "load_extension() is not allowed" in extension.error
