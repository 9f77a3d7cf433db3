"""Dialects: translation keeps SQLite's meaning on real servers; the embedded check keeps each dialect's.

Every fix in translate() is shown on a real PostgreSQL and MariaDB server (tests/servers.py starts them;
skipped with the reason where the Debian packages are missing): the SQLite query's rows, the
translation's rows on the server, and sqlglot alone failing or answering otherwise. Every semantic
to_engine keeps is shown by running its output in DuckDB against a known answer, and against the real
server where there is one. The last test runs the fidelity benchmark's core on a few Spider queries.
"""

import sqlite3
import sys

import duckdb
import pytest
import sqlglot

from conftest import ROOT
from servers import mariadb_available, mariadb_server, postgres_available, postgres_server
from starsql.db.dialects import (DIALECTS, ENGINE, ENGINE_SETTINGS, NOT_VERIFIED, DialectError, check_dialect,
                                 format_sql, to_engine, translate)
from starsql.evaluate.metrics import results_match
from starsql.schema import Column, Table, render_schema

sys.path.insert(0, str(ROOT / "bench"))
import dialect_fidelity  # noqa: E402

# A SQLite database as Spider's look: mixed-case table names, numbers kept in text columns.
TABLES = [
    Table("Singer", [Column("singer_id", "INTEGER"), Column("name", "TEXT"), Column("country", "TEXT"),
                     Column("year", "TEXT"), Column("age", "INTEGER")], primary_key=["singer_id"]),
    Table("Concert", [Column("concert_id", "INTEGER"), Column("singer_id", "INTEGER"), Column("stadium_id", "TEXT")],
          primary_key=["concert_id"]),
]
ROWS = {
    "Singer": [(1, "Ann Lee", "France", "2014", 30), (2, "bob ray", "Spain", "2015", 41), (3, "Cy", "Peru", "2014", 36),
               (4, "ann marie", "Chile", "1999", 41)],
    "Concert": [(1, 1, "1"), (2, 1, "2"), (3, 2, "2"), (4, 3, "3")],
}


@pytest.fixture(scope="module")
def sqlite_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dialects") / "test.sqlite"
    connection = sqlite3.connect(path)
    connection.executescript(render_schema(TABLES))
    for table in TABLES:
        marks = ", ".join("?" * len(table.columns))
        connection.executemany(f"INSERT INTO {table.name} VALUES ({marks})", ROWS[table.name])
    connection.commit()
    connection.close()
    return path


def sqlite_rows(path, sql: str) -> list[tuple]:
    return [tuple(map(dialect_fidelity.normal_value, row)) for row in sqlite3.connect(path).execute(sql).fetchall()]


def loaded(target, sqlite_file):
    """The test database on `target` (the bench's loader), and the schema the server reports for it."""
    tables, rows, _ = dialect_fidelity.load_sqlite(sqlite_file)
    return target, target.load("dialects_test", tables, rows)


@pytest.fixture(scope="module")
def postgres(sqlite_file):
    if postgres_available():
        pytest.skip(postgres_available())
    with postgres_server() as url:
        target = dialect_fidelity.PostgresTarget(url)
        yield loaded(target, sqlite_file)
        target.close()


@pytest.fixture(scope="module")
def mariadb(sqlite_file):
    if mariadb_available():
        pytest.skip(mariadb_available())
    with mariadb_server() as url:
        target = dialect_fidelity.MysqlTarget(url)
        yield loaded(target, sqlite_file)
        target.close()


@pytest.fixture(params=["postgres", "mysql"])
def server(request):
    return request.getfixturevalue("mariadb" if request.param == "mysql" else "postgres")


def on_server(server, sql: str) -> dict:
    return server[0].run(sql)


# Each fix: a SQLite query whose meaning sqlglot alone loses on both servers.
FIXES = {
    "double-quoted string": 'SELECT name FROM Singer WHERE country = "France"',
    "LIKE ignores case (PostgreSQL; MySQL's collation already does)": "SELECT name FROM Singer WHERE name LIKE 'ann%'",
    "text column against a number": "SELECT count(*) FROM Singer WHERE year = 2014",
    "text column joined to an integer column": "SELECT T1.name FROM Singer AS T1 JOIN Concert AS T2 "
                                               "ON T1.singer_id = T2.stadium_id",
    "a grouped query's bare column": "SELECT T1.name, count(*) FROM Singer AS T1 JOIN Concert AS T2 "
                                     "ON T1.singer_id = T2.singer_id GROUP BY T2.singer_id",
    "the row of a lone MAX": "SELECT name, max(age) FROM Singer WHERE singer_id < 4",
    "the row of a lone MAX, a row of NULLs when none matches": "SELECT name, max(age) FROM Singer WHERE age > 100",
    "the row of each group's MAX": "SELECT name, year, max(age) FROM Singer GROUP BY year",
    "derived table without alias": "SELECT count(*) FROM (SELECT name FROM Singer INTERSECT SELECT name FROM Singer)",
    "table name's case (MySQL)": "SELECT count(*) FROM singer AS s JOIN concert AS C ON S.singer_id = c.singer_id",
    "LIMIT in an IN subquery (MySQL)": "SELECT name FROM Singer WHERE singer_id IN "
                                       "(SELECT singer_id FROM Concert ORDER BY concert_id LIMIT 1)",
    "AVG is a float (MySQL)": "SELECT avg(age) FROM Singer WHERE singer_id < 4",
    "integers divide to an integer, truncated toward zero (MySQL)":
        "SELECT name, age / 8, -age / 8, (age + 1) / singer_id, sum(age) / count(*) FROM Singer GROUP BY name",
}
# Where sqlglot alone already agrees on one server (the fix is for the other), by name.
SQLGLOT_ALREADY_RIGHT = {("LIKE ignores case (PostgreSQL; MySQL's collation already does)", "mysql"),
                         ("table name's case (MySQL)", "postgres"), ("LIMIT in an IN subquery (MySQL)", "postgres"),
                         ("AVG is a float (MySQL)", "postgres"),
                         ("integers divide to an integer, truncated toward zero (MySQL)", "postgres"), ("text column against a number", "mysql"),
                         ("text column joined to an integer column", "mysql"),
                         ("a grouped query's bare column", "mysql"),
                         ("the row of a lone MAX, a row of NULLs when none matches", "mysql")}  # MariaDB's default sql_mode allows it


@pytest.mark.parametrize("fix", FIXES)
def test_translate_keeps_sqlite_meaning_on_real_servers(server, sqlite_file, fix):
    target, schema = server
    sql = FIXES[fix]
    expected = sqlite_rows(sqlite_file, sql)
    fixed = on_server(server, translate(sql, target.dialect, schema=schema))
    assert "error" not in fixed, (translate(sql, target.dialect, schema=schema), fixed)
    assert results_match(expected, fixed["rows"], order_matters=False), (fixed["rows"], expected)
    alone = on_server(server, sqlglot.transpile(sql, read="sqlite", write=target.dialect)[0])
    if (fix, target.dialect) not in SQLGLOT_ALREADY_RIGHT:
        assert "error" in alone or not results_match(expected, alone["rows"], order_matters=False), alone


def test_postgres_names_that_are_not_lower_case_are_quoted_as_the_schema_spells_them(postgres):
    target = postgres[0]
    target.connection.execute('CREATE TABLE "PetsMixed" ("PetID" integer, weight integer)')
    target.connection.execute('INSERT INTO "PetsMixed" VALUES (7, 3)')
    schema = [Table("PetsMixed", [Column("PetID", "INTEGER"), Column("weight", "INTEGER")])]
    sql = "SELECT petid FROM petsmixed AS p WHERE P.weight = 3"
    assert translate(sql, "postgres", schema=schema) == 'SELECT "PetID" FROM "PetsMixed" AS p WHERE p.weight = 3'
    assert target.run(translate(sql, "postgres", schema=schema)) == {"rows": [(7,)]}
    assert translate(sql, "mysql", schema=schema) == "SELECT petid FROM PetsMixed AS p WHERE p.weight = 3"


def test_snowflake_names_that_are_not_upper_case_are_quoted():
    """Snowflake stores bare names in upper case: a quoted lower- or mixed-case name must stay quoted."""
    schema = [Table("PETS", [Column("PETID", "INTEGER"), Column("Owner", "TEXT")])]
    assert translate("SELECT petid, owner FROM pets", "snowflake", schema=schema) == 'SELECT petid, "Owner" FROM PETS'


def test_translate_without_schema_still_reads_double_quoted_strings_and_like():
    assert translate('SELECT a FROM t WHERE b = "x y" AND c LIKE "%z"', "postgres") == \
        "SELECT a FROM t WHERE b = 'x y' AND c ILIKE '%z'"
    assert translate('SELECT "b" FROM t', "postgres") == 'SELECT "b" FROM t'  # a quoted column stays one
    schema = [Table("t", [Column("a", "TEXT")])]
    assert translate('SELECT count(*) AS "n" FROM t ORDER BY "n"', "postgres", schema=schema) == \
        'SELECT COUNT(*) AS "n" FROM t ORDER BY "n" NULLS FIRST'  # an output's name, not a string
    assert translate("SELECT a FROM t WHERE b LIKE 'x%'", "bigquery") == \
        "SELECT a FROM t WHERE LOWER(b) LIKE LOWER('x%')"


def test_bare_column_next_to_a_lone_max_over_a_join_is_left_to_fail_not_changed():
    # SQLite takes `name` from each group's row holding the max; MIN(name) would answer otherwise, silently.
    sql = ("SELECT T1.name, max(T1.age) FROM Singer AS T1 JOIN Concert AS T2 ON T1.singer_id = T2.singer_id "
           "GROUP BY T2.stadium_id")
    assert translate(sql, "postgres") == sql.replace("max(", "MAX(")
    assert translate("SELECT name, max(age) OVER () FROM Singer", "postgres") == \
        "SELECT name, MAX(age) OVER () FROM Singer"  # a window function does not group
    assert translate("SELECT name, max(age) FROM Singer ORDER BY name", "postgres") == \
        "SELECT name, MAX(age) FROM Singer ORDER BY name NULLS FIRST"  # ORDER BY ... LIMIT 1 would need rewriting


def test_translate_errors_name_the_dialect_and_same_dialect_is_unchanged():
    with pytest.raises(DialectError, match="Cannot read this SQL as sqlite"):
        translate("SELECT (((", "postgres")
    with pytest.raises(DialectError, match="choose one of sqlite, postgres, mysql"):
        translate("SELECT 1", "oracle")
    assert translate('SELECT "x"', "sqlite") == 'SELECT "x"'


def test_check_dialect():
    assert check_dialect(" PostgreS ") == "postgres"
    for bad in ("postgresql", "", None, 3):
        with pytest.raises(DialectError, match="Unknown SQL dialect .*choose one of sqlite, postgres, mysql, duckdb"):
            check_dialect(bad)


def test_every_dialect_has_an_engine_and_an_honest_sentence():
    assert set(ENGINE) == set(NOT_VERIFIED) == set(DIALECTS)
    assert set(ENGINE.values()) == {"sqlite", "duckdb"} and ENGINE["sqlite"] == "sqlite"
    assert "trailing spaces" in NOT_VERIFIED["mysql"] and "collation" in NOT_VERIFIED["mysql"]
    assert all(sentence.endswith(".") and len(sentence) < 300 for sentence in NOT_VERIFIED.values())


# Semantics the embedded check must keep: (dialect, SQL, the real dialect's known answer).
SEMANTICS = [
    ("postgres", "SELECT 'Ann' ILIKE 'ann', 'Ann' LIKE 'ann'", [(True, False)]),
    ("postgres", "SELECT '2024-03-05'::date + 1", [("2024-03-06",)]),
    ("postgres", "SELECT 7 / 2, -7 / 2, 7.0 / 2", [(3, -3, 3.5)]),
    ("postgres", "SELECT TRUE AND NOT FALSE, 1 < 2", [(True, True)]),
    ("postgres", "SELECT CAST('2014-06-01' AS DATE) > DATE '2014-01-31'", [(True,)]),
    ("mysql", "SELECT YEAR('2014-06-01'), `x`.`y` FROM (SELECT 1 AS `y`) AS `x`", [(2014, 1)]),
    ("mysql", "SELECT 'Ann' LIKE 'ann%', 7 / 2, 7 DIV 2", [(1, 3.5, 3)]),
    ("mysql", "SELECT 'Ann' = 'ann', 'a' < 'B', COUNT(DISTINCT x) FROM (SELECT 'Ann' AS x UNION ALL SELECT 'ANN') AS t",
     [(1, 1, 1)]),  # the default collation ignores case
    ("tsql", "SELECT TOP 1 7 / 2 AS half", [(3,)]),
]


def engine_rows(sql: str, dialect: str) -> list[tuple]:
    connection = duckdb.connect()
    for setting in ENGINE_SETTINGS.get(dialect, ()):
        connection.execute(setting)
    rows = connection.execute(to_engine(sql, dialect)).fetchall()
    return [tuple(map(dialect_fidelity.normal_value, row)) for row in rows]


@pytest.mark.parametrize("dialect, sql, known", SEMANTICS, ids=[s[1][:40] for s in SEMANTICS])
def test_to_engine_keeps_the_dialect_meaning(dialect, sql, known):
    assert engine_rows(sql, dialect) == known


@pytest.mark.parametrize("dialect, sql, known", [s for s in SEMANTICS if s[0] in ("postgres", "mysql")],
                         ids=[s[1][:40] for s in SEMANTICS if s[0] in ("postgres", "mysql")])
def test_known_answers_are_the_real_servers_answers(request, dialect, sql, known):
    server = request.getfixturevalue("mariadb" if dialect == "mysql" else "postgres")
    assert on_server(server, sql) == {"rows": known}


def test_to_engine_on_the_test_tables_matches_mariadb_like_case(mariadb):
    # MySQL's LIKE ignores case under its default collation: DuckDB is told so (ILIKE).
    sql = "SELECT name FROM `Singer` WHERE name LIKE 'ANN%' ORDER BY singer_id"
    assert "ILIKE" in to_engine(sql, "mysql")
    assert on_server(mariadb, sql)["rows"] == [("Ann Lee",), ("ann marie",)]


def test_format_sql_pretty_prints_in_the_dialect_and_falls_back():
    pretty = format_sql("select a, count(*) from t where b = 1 group by a", "postgres")
    assert pretty.splitlines()[0] == "SELECT" and "GROUP BY" in pretty
    same = "SELECT a, COUNT(*) FROM t WHERE b = 1 GROUP BY a"
    assert sqlglot.parse_one(pretty, read="postgres") == sqlglot.parse_one(same)
    assert format_sql("SELECT (((", "mysql") == "SELECT ((("


def test_fidelity_bench_core_on_a_few_spider_queries(spider_dir, postgres, mariadb):
    # 20 compares a text column with numbers, 22 joins text to integers and shows a bare grouped column
    # (both fail on PostgreSQL through sqlglot alone); 45 names the table Pets `pets` (fails on MariaDB).
    indices = {20, 22, 45}
    result = dialect_fidelity.run_benchmark(spider_dir, {"postgres": postgres[0], "mysql": mariadb[0]},
                                            indices=indices, progress=False)
    assert result["queries"] == len(indices) and result["counts"]["sqlite_errors"] == 0
    for dialect in ("postgres", "mysql"):
        assert result["counts"][f"{dialect}/schema"]["verdicts"] == {"same": len(indices)}
        assert result["counts"][f"{dialect}/duckdb-check"]["agreement"] == {"same rows": len(indices)}
    assert result["counts"]["postgres/sqlglot"]["verdicts"].get("error") == 2  # what the fixes are for
    assert result["counts"]["mysql/sqlglot"]["verdicts"].get("error") == 1
    assert "| MariaDB" in dialect_fidelity.markdown(result)


DEEP_SQL = "SELECT " + "(" * 3000 + "1" + ")" * 3000  # deeper than Python's stack lets sqlglot recurse


def test_sql_nested_too_deeply_is_a_dialect_error_not_a_crash(sqlite_file):
    for call in (lambda: translate(DEEP_SQL, "postgres"), lambda: translate(DEEP_SQL, "mysql", read="postgres"),
                 lambda: to_engine(DEEP_SQL, "postgres"), lambda: to_engine(DEEP_SQL, "mysql")):
        with pytest.raises(DialectError, match="nested too deeply"):
            call()
    assert format_sql(DEEP_SQL, "postgres") == DEEP_SQL  # as given: the check says why
    from starsql.db.workspace import open_workspace

    # The embedded DuckDB check, and a live database the SQL is translated for (SQLite, dialect postgres).
    for workspace in (open_workspace("CREATE TABLE t (a integer);", "postgres"),
                      open_workspace(dialect="postgres", url=f"sqlite:///{sqlite_file}")):
        try:
            result = workspace.check(DEEP_SQL)
        finally:
            workspace.close()
        assert not result.valid and "nested too deeply" in result.error


def test_integer_division_truncates_toward_zero_in_duckdb_and_is_written_so_elsewhere(sqlite_file):
    sql = "SELECT singer_id, age / 8, -age / 8, age / (singer_id - 1), age / 8.0 FROM Singer"
    expected = sqlite_rows(sqlite_file, sql)  # -41 / 8 = -5 (not -6); / 0 is NULL; 8.0 is a real
    connection = duckdb.connect()
    connection.execute(render_schema(TABLES))
    for table in TABLES:
        connection.executemany(f"INSERT INTO {table.name} VALUES ({', '.join('?' * len(table.columns))})",
                               ROWS[table.name])
    translated = translate(sql, "duckdb", schema=TABLES)
    assert translated.count("//") == 3, translated
    rows = [tuple(map(dialect_fidelity.normal_value, row)) for row in connection.execute(translated).fetchall()]
    assert rows == expected
    alone = connection.execute(sqlglot.transpile(sql, read="sqlite", write="duckdb")[0]).fetchall()
    assert [row[1] for row in alone] != [row[1] for row in expected]  # 3.75: what the fix is for
    assert translate("SELECT 7 / 2, -7 / 2, 7 / 2.0", "bigquery") == \
        "SELECT DIV(7, NULLIF(2, 0)), DIV(-7, NULLIF(2, 0)), 7 / NULLIF(2.0, 0)"
    assert translate("SELECT 7 / 2", "snowflake") == "SELECT CAST(TRUNC(7 / NULLIF(2, 0)) AS BIGINT)"
    assert translate("SELECT 7 / 2, -7 / 2", "postgres") == "SELECT 7 / NULLIF(2, 0), -7 / NULLIF(2, 0)"  # truncates
    assert translate("SELECT 7 / 2", "tsql") == "SELECT 7 / NULLIF(2, 0)"  # already


def column_names(server, sql: str) -> list[str]:
    with server[0].connection.cursor() as cursor:
        cursor.execute(sql)
        return [column[0] for column in cursor.description]


def test_the_row_of_a_lone_max_keeps_the_aggregates_name_and_sqlites_row_of_nulls(server, sqlite_file):
    target, schema = loaded(server[0], sqlite_file)  # again: the fidelity test loads Spider's databases
    connection = duckdb.connect()
    connection.execute(render_schema(TABLES))
    for sql, names in [("SELECT name, max(age) FROM Singer WHERE age > 100", ["name", "max(age)"]),
                       ("SELECT name, min(age) AS youngest FROM Singer", ["name", "youngest"]),
                       ("SELECT name, MAX( age ) FROM Singer", ["name", "MAX( age )"]),  # SQLite's: as written
                       ("SELECT name, year, max(age) FROM Singer GROUP BY year", ["name", "year", "max(age)"])]:
        sqlite_cursor = sqlite3.connect(sqlite_file).execute(sql)
        assert [column[0] for column in sqlite_cursor.description] == names
        translated = translate(sql, target.dialect, schema=schema)
        assert column_names(server, translated) == names, translated
        in_duckdb = connection.execute(translate(sql, "duckdb", schema=TABLES))
        assert [column[0] for column in in_duckdb.description] == names
    nothing = "SELECT name, max(age) FROM Singer WHERE age > 100"
    assert connection.execute(translate(nothing, "duckdb", schema=TABLES)).fetchall() == [(None, None)]
