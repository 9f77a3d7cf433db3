"""Does the translated SQL mean what the SQLite SQL meant? Spider dev's gold queries on real servers.

Each of Spider dev's executable gold queries (972 of 1,034: the shared copy lacks wta_1) is translated
from SQLite to PostgreSQL and to MySQL three ways: by sqlglot alone, by `translate()` (sqlglot plus the
project's fixes), and by `translate(schema=...)` given the schema the server reports (as the app passes
its workspace's tables). Each translation runs on the same data loaded into a real PostgreSQL and a
real MariaDB server (tests/servers.py starts them from the Debian packages in a temporary directory,
no network). Rows are compared with SQLite's the way starsql/evaluate/metrics.py compares results: as
multisets, in order only when the query has ORDER BY, numbers equal to 10 significant digits whatever
their type (Decimal, float, int). Queries run as written (DISTINCT kept). A difference counts apart
when SQLite's own answer depends on row order: ties under ORDER BY (with LIMIT: which tied row is
shown, or the bare column of a group with several maxima), found by running the query again with
every ORDER BY completed by all output columns, ascending and descending, with PRAGMA
reverse_unordered_selects, and on a copy of the data with every table's rows in reverse order.

The app's own check (`to_engine`: DuckDB runs the user's-dialect SQL with ENGINE_SETTINGS) is measured
on the same queries: the DuckDB run of each final translation against the real server's run of it.

Loading. Each database's tables come from the schema model (starsql.schema.sqlite_tables) and their
CREATE TABLE is translated by `translate()`. Column types follow the values SQLite actually stores,
so every value arrives unchanged and computes as it did in SQLite: integers only -> BIGINT, any
reals -> DOUBLE (DECIMAL(p,s) as declared), any text -> VARCHAR/TEXT, blobs -> BLOB; a column with no
values by its declared type's affinity. Spider's dirty columns (text in columns declared `bool`:
'T'/'F', and stadium names in orchestra's show.If_first_show; dates kept as text in columns declared
DATETIME) are thus text, as SQLite holds them; the JSON's "loading" lists them. A primary key is kept where the data satisfies it; foreign keys are left out
(Spider's rows break some, and no query needs them).

    python bench/dialect_fidelity.py --spider ../shared/spider_dev --out bench/results/dialect_fidelity.json
"""

import argparse
import datetime
import decimal
import json
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import sqlglot  # noqa: E402
from sqlglot import exp  # noqa: E402

from starsql.db.dialects import ENGINE_SETTINGS, DialectError, sqlite_affinity, to_engine, translate  # noqa: E402
from starsql.evaluate.metrics import order_matters, results_match  # noqa: E402
from starsql.evaluate.spider import FLOAT_DIGITS, KNOWN_MISSING_DBS, Database, database_path  # noqa: E402
from starsql.schema import Column, Table, quote_identifier, render_table, sqlite_tables  # noqa: E402

TARGETS = ("postgres", "mysql")
TIMEOUT_S = 30
MYSQL_VARCHAR = 255  # longer text goes to TEXT (MySQL cannot key a TEXT column without a prefix length)


# ---------------------------------------------------------------------------------------------- data

def gold_queries(spider_dir: Path) -> list[dict]:
    """Spider dev's gold queries whose database is here: {index, db_id, sql}, in dev order."""
    lines = (spider_dir / "dev_gold.sql").read_text().splitlines()
    queries = []
    for index, line in enumerate(lines):
        sql, db_id = line.rsplit("\t", 1)
        if db_id not in KNOWN_MISSING_DBS and database_path(spider_dir, db_id).is_file():
            queries.append({"index": index, "db_id": db_id, "sql": sql.strip()})
    return queries


def _stored_type(connection: sqlite3.Connection, table: str, column: Column) -> str:
    """The type that holds the values SQLite stores in `column` unchanged (see the module docstring)."""
    name, quoted_table = quote_identifier(column.name), quote_identifier(table)
    kinds = dict(connection.execute(f"SELECT typeof({name}), max(length({name})) FROM {quoted_table} "
                                    f"WHERE {name} IS NOT NULL GROUP BY 1").fetchall())
    declared = column.type.upper()
    if "blob" in kinds:
        return "BLOB"
    if "text" in kinds:
        return f"VARCHAR({MYSQL_VARCHAR})" if kinds["text"] <= MYSQL_VARCHAR else "TEXT"
    if "real" in kinds:
        return declared if declared.startswith(("DECIMAL", "NUMERIC")) and "(" in declared else "DOUBLE"
    if "integer" in kinds:
        return "BIGINT"
    return {"integer": "BIGINT", "real": "DOUBLE", "numeric": "DOUBLE"}.get(  # no values: the declared affinity
        sqlite_affinity(declared), f"VARCHAR({MYSQL_VARCHAR})")


def _unique(connection: sqlite3.Connection, table: str, key: list[str]) -> bool:
    """Do the rows satisfy PRIMARY KEY (key): no NULLs, no two alike? (SQLite does not enforce it.)"""
    distinct, nulls, total = connection.execute(
        f"SELECT (SELECT count(*) FROM (SELECT DISTINCT {', '.join(key)} FROM {table})), "
        f"(SELECT count(*) FROM {table} WHERE {' OR '.join(f'{k} IS NULL' for k in key)}), "
        f"(SELECT count(*) FROM {table})").fetchone()
    return nulls == 0 and distinct == total


def load_sqlite(path: Path) -> tuple[list[Table], dict[str, list[tuple]], list[str]]:
    """(tables with value-preserving types, rows per table, notes on what loading changed)."""
    connection = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    connection.text_factory = lambda data: data.decode(errors="replace")  # as evaluate/spider.py reads it
    tables, rows, notes = [], {}, []
    for table in sqlite_tables(connection):
        if table.view:
            continue
        name = quote_identifier(table.name)
        columns = []
        for column in table.columns:
            stored = _stored_type(connection, table.name, column)
            if stored.startswith(("VARCHAR", "TEXT")) and sqlite_affinity(column.type) != "text":
                notes.append(f"{table.name}.{column.name}: declared {column.type}, holds text -> {stored}")
            columns.append(Column(column.name, stored))
        rows[table.name] = connection.execute(f"SELECT * FROM {name}").fetchall()
        key = table.primary_key
        if key and not _unique(connection, name, [quote_identifier(c) for c in key]):
            notes.append(f"{table.name}: primary key ({', '.join(key)}) not unique in the data -> left out")
            key = []
        tables.append(Table(table.name, columns, primary_key=list(key)))
    connection.close()
    return tables, rows, notes


def _table_name(name: str, dialect: str) -> str:
    """`name` as the translated DDL spells it in `dialect` (bare names fold the same way there)."""
    return exp.to_table(quote_identifier(name), dialect="sqlite").sql(dialect=dialect)


def normal_value(value):
    """One spelling per value whatever the driver returns: numbers to 10 significant digits."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, decimal.Decimal):
        value = float(value)
    if isinstance(value, float):
        return float(f"{value:.{FLOAT_DIGITS}g}")
    if isinstance(value, (datetime.date, datetime.time, datetime.timedelta)):
        return str(value)
    if isinstance(value, (memoryview, bytearray)):
        return bytes(value)
    return value


# ------------------------------------------------------------------------------------------ servers

def _introspect(columns: list[tuple]) -> list[Table]:
    """The schema as the server reports it (names as it spells them): what the app's workspace holds."""
    tables: dict[str, Table] = {}
    for table, column, data_type in columns:
        tables.setdefault(table, Table(table, [])).columns.append(Column(column, data_type.upper()))
    return list(tables.values())


class Outcome(dict):
    """{"rows": [...]} or {"error": kind, "message": text}."""


class PostgresTarget:
    dialect = "postgres"

    def __init__(self, url: str):
        import psycopg

        self.psycopg = psycopg
        self.connection = psycopg.connect(url, autocommit=True)
        self.version = self.connection.execute("SHOW server_version").fetchone()[0]
        self.connection.execute(f"SET statement_timeout = {TIMEOUT_S * 1000}")

    def load(self, db_id: str, tables: list[Table], rows: dict[str, list[tuple]]) -> list[Table]:
        schema = '"' + db_id + '"'
        self.connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        self.connection.execute(f"CREATE SCHEMA {schema}")
        self.connection.execute(f"SET search_path TO {schema}")
        with self.connection.cursor() as cursor:
            for table in tables:
                cursor.execute(translate(render_table(table), "postgres"))
                with cursor.copy(f"COPY {_table_name(table.name, 'postgres')} FROM STDIN") as copy:
                    for row in rows[table.name]:
                        copy.write_row(row)
        return _introspect(self.connection.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position").fetchall())

    def close(self) -> None:
        self.connection.close()

    def run(self, sql: str) -> Outcome:
        try:
            with self.connection.cursor() as cursor:
                cursor.execute(sql)
                return Outcome(rows=[tuple(map(normal_value, row)) for row in cursor.fetchall()])
        except self.psycopg.Error as error:
            return Outcome(error=type(error).__name__, message=str(error).splitlines()[0][:300])


class MysqlTarget:
    dialect = "mysql"

    def __init__(self, url: str):
        import pymysql
        from pymysql.constants import ER
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.pymysql = pymysql
        self.codes = {value: name for name, value in vars(ER).items() if isinstance(value, int)}
        self.database = parts.path.lstrip("/")
        self.connection = pymysql.connect(host=parts.hostname, port=parts.port, user=parts.username,
                                          password=parts.password, database=self.database, autocommit=True,
                                          charset="utf8mb4")
        # Debian's MariaDB ships utf8mb4 as its default character set (the bare server's is latin1).
        self._execute(f"ALTER DATABASE {self.database} CHARACTER SET utf8mb4")
        self._execute(f"SET SESSION max_statement_time = {TIMEOUT_S}")
        self.version = self._execute("SELECT version()")[0][0]

    def _execute(self, sql: str, rows=None):
        with self.connection.cursor() as cursor:
            if rows is None:
                cursor.execute(sql)
            else:
                cursor.executemany(sql, rows)
            return cursor.fetchall()

    def load(self, db_id: str, tables: list[Table], rows: dict[str, list[tuple]]) -> list[Table]:
        # One database per server (the test user's rights): each Spider database replaces the last.
        for (name,) in self._execute("SHOW TABLES"):
            self._execute(f"DROP TABLE `{name}`")
        for table in tables:
            self._execute(translate(render_table(table), "mysql"))
            if rows[table.name]:
                marks = ", ".join(["%s"] * len(table.columns))
                self._execute(f"INSERT INTO {_table_name(table.name, 'mysql')} VALUES ({marks})", rows[table.name])
        return _introspect(self._execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = DATABASE() ORDER BY table_name, ordinal_position"))

    def close(self) -> None:
        self.connection.close()

    def run(self, sql: str) -> Outcome:
        try:
            return Outcome(rows=[tuple(map(normal_value, row)) for row in self._execute(sql)])
        except self.pymysql.Error as error:
            code = error.args[0] if error.args and isinstance(error.args[0], int) else None
            kind = self.codes.get(code, type(error).__name__)
            return Outcome(error=kind, message=str(error.args[-1])[:300])


class DuckdbEngine:
    """The app's check: DuckDB in memory, one database per dialect with that dialect's ENGINE_SETTINGS
    (settings are per database), running to_engine(SQL)."""

    def __init__(self, dialects):
        self.dialects = list(dialects)

    def load(self, db_id: str, tables: list[Table], rows: dict[str, list[tuple]]) -> None:
        self.connections = {}
        for dialect in self.dialects:
            connection = self.connections[dialect] = duckdb.connect()
            for setting in ENGINE_SETTINGS.get(dialect, ()):
                connection.execute(setting)
            for table in tables:
                connection.execute(translate(render_table(table), "duckdb"))
                if rows[table.name]:
                    marks = ", ".join(["?"] * len(table.columns))
                    connection.executemany(f"INSERT INTO {_table_name(table.name, 'duckdb')} VALUES ({marks})",
                                           rows[table.name])

    def run(self, sql: str, dialect: str) -> Outcome:
        try:
            engine_sql = to_engine(sql, dialect)
            return Outcome(rows=[tuple(map(normal_value, row)) for row in
                                 self.connections[dialect].execute(engine_sql).fetchall()])
        except DialectError as error:
            return Outcome(error="DialectError", message=str(error)[:300])
        except duckdb.Error as error:
            return Outcome(error=type(error).__name__, message=str(error).splitlines()[0][:300])


# ---------------------------------------------------------------------------------------- the bench

def verdict(gold: list[tuple], outcome: Outcome, ordered: bool) -> str:
    """same | order (same rows, ties ordered differently) | different | error."""
    if "error" in outcome:
        return "error"
    if results_match(gold, outcome["rows"], ordered):
        return "same"
    if ordered and results_match(gold, outcome["rows"], False):
        return "order"
    return "different"


MODES = {"sqlglot": "sqlglot alone", "translate": "translate()", "schema": "translate(schema=)"}


def _reversed_copy(tables: list[Table], rows: dict[str, list[tuple]]) -> Database:
    """The database in memory with every table's rows in reverse order and no keys (so no index orders
    them either): a query whose answer changes here picks among rows by their order (ties, or the bare
    column of a group with several maxima)."""
    connection = sqlite3.connect(":memory:", check_same_thread=False)
    for table in tables:
        connection.execute(render_table(Table(table.name, table.columns)))
        marks = ", ".join("?" * len(table.columns))
        connection.executemany(f"INSERT INTO {quote_identifier(table.name)} VALUES ({marks})", rows[table.name][::-1])
    return Database(connection, ":memory:")


def _tie_breaks(sql: str) -> list[str]:
    """`sql` with each ORDER BY completed by every output column, ascending and descending: when these
    answer differently, rows tie under an ORDER BY and which come first (or within LIMIT) is arbitrary."""
    variants = []
    for desc in (False, True):
        variant = sqlglot.parse_one(sql, read="sqlite")
        ordered = [node for node in variant.find_all(exp.Query) if node.args.get("order")]
        for query in ordered:
            query.args["order"].set("expressions", query.args["order"].expressions + [
                exp.Ordered(this=exp.Literal.number(i + 1), desc=desc) for i in range(len(query.selects))])
        if ordered:
            variants.append(variant.sql(dialect="sqlite"))
    return variants


def _translations(sql: str, dialect: str, schema: list[Table]) -> dict[str, str | Outcome]:
    """{mode: translated SQL, or an Outcome error when the translator failed}: sqlglot alone,
    translate() without the schema, translate() with the schema the server reports (as the app has it)."""
    out = {}
    for mode, function in (("sqlglot", lambda: ";\n".join(sqlglot.transpile(sql, read="sqlite", write=dialect))),
                           ("translate", lambda: translate(sql, dialect)),
                           ("schema", lambda: translate(sql, dialect, schema=schema))):
        try:
            out[mode] = function()
        except (sqlglot.errors.SqlglotError, DialectError) as error:
            out[mode] = Outcome(error="translation", message=str(error)[:300])
    return out


def run_benchmark(spider_dir: Path, targets: dict, duck: bool = True, indices: set[int] | None = None,
                  progress: bool = True) -> dict:
    """Every gold query (or those in `indices`) on every target; per-query records and the counts."""
    from tqdm import tqdm

    queries = [q for q in gold_queries(spider_dir) if indices is None or q["index"] in indices]
    by_db = defaultdict(list)
    for query in queries:
        by_db[query["db_id"]].append(query)
    engine = DuckdbEngine(targets) if duck else None
    records, loading = [], {}
    bar = tqdm(total=len(queries), desc="gold queries", unit="query", disable=not progress)
    for db_id, db_queries in by_db.items():
        path = database_path(spider_dir, db_id)
        tables, rows, notes = load_sqlite(path)
        loading[db_id] = notes
        schemas = {dialect: target.load(db_id, tables, rows) for dialect, target in targets.items()}
        if engine:
            engine.load(db_id, tables, rows)
        sqlite, reversed_scans, reversed_rows = (Database.open_read_only(path), Database.open_read_only(path),
                                                 _reversed_copy(tables, rows))
        reversed_scans.connection.set_authorizer(None)  # its own read-only connection; the pragma needs it
        reversed_scans.connection.execute("PRAGMA reverse_unordered_selects = ON")
        for query in db_queries:
            gold = sqlite.run(query["sql"], timeout=TIMEOUT_S)
            record = {"index": query["index"], "db_id": db_id, "sql": query["sql"]}
            if gold.error:
                record["sqlite_error"] = gold.error
                records.append(record)
                bar.update()
                continue
            ordered = order_matters(query["sql"])
            # SQLite's answer itself depends on the order rows are scanned in (ties under ORDER BY ...
            # LIMIT, a bare column of a group): a server may answer otherwise and be as right.
            agains = [database.run(query["sql"], timeout=TIMEOUT_S) for database in (reversed_scans, reversed_rows)]
            agains += [sqlite.run(variant, timeout=TIMEOUT_S) for variant in _tie_breaks(query["sql"])]
            record["scan_order_dependent"] = any(
                again.error is None and not results_match(gold.rows, again.rows, ordered) for again in agains)
            for dialect, target in targets.items():
                result = record[dialect] = {}
                for mode, translated in _translations(query["sql"], dialect, schemas[dialect]).items():
                    outcome = translated if isinstance(translated, Outcome) else target.run(translated)
                    entry = result[mode] = {"sql": translated if isinstance(translated, str) else None,
                                            "verdict": verdict(gold.rows, outcome, ordered)}
                    if "error" in outcome:
                        entry.update(error=outcome["error"], message=outcome["message"])
                    if mode == "schema" and engine and isinstance(translated, str):
                        checked = engine.run(translated, dialect)
                        result["engine"] = {"verdict_vs_sqlite": verdict(gold.rows, checked, ordered),
                                            "agrees_with_server": _agree(outcome, checked, ordered)}
                        if "error" in checked:
                            result["engine"].update(error=checked["error"], message=checked["message"])
            records.append(record)
            bar.update()
        sqlite.close()
        reversed_scans.close()
        reversed_rows.close()
    bar.close()
    versions = {dialect: target.version for dialect, target in targets.items()}
    return {"queries": len(queries), "servers": versions, "duckdb": duckdb.__version__,
            "sqlglot": sqlglot.__version__, "counts": summarize(records, list(targets)), "loading": loading,
            "records": records}


def _agree(server: Outcome, engine: Outcome, ordered: bool) -> str:
    """Does the embedded check tell what the server does? same rows | both error | server-only error | ..."""
    if "error" in server and "error" in engine:
        return "both error"
    if "error" in server:
        return "engine runs, server errors"
    if "error" in engine:
        return "engine errors, server runs"
    return "same rows" if verdict(server["rows"], engine, ordered) in ("same", "order") else "different rows"


def summarize(records: list[dict], dialects: list[str]) -> dict:
    counts = {}
    for dialect in dialects:
        for mode in MODES:
            entries = [r[dialect][mode] for r in records if dialect in r]
            differing = [r for r in records if dialect in r and r[dialect][mode]["verdict"] in ("different", "order")]
            counts[f"{dialect}/{mode}"] = {
                "verdicts": dict(Counter(e["verdict"] for e in entries)),
                "different_where_sqlite_depends_on_scan_order": sum(r["scan_order_dependent"] for r in differing),
                "errors": dict(Counter(e["error"] for e in entries if "error" in e).most_common()),
            }
        engine = [r[dialect]["engine"] for r in records if dialect in r and "engine" in r[dialect]]
        if engine:
            counts[f"{dialect}/duckdb-check"] = {
                "agreement": dict(Counter(e["agrees_with_server"] for e in engine)),
                "different_where_sqlite_depends_on_scan_order": sum(
                    r["scan_order_dependent"] for r in records
                    if dialect in r and r[dialect].get("engine", {}).get("agrees_with_server") == "different rows"),
                "verdicts_vs_sqlite": dict(Counter(e["verdict_vs_sqlite"] for e in engine)),
                "errors": dict(Counter(e["error"] for e in engine if "error" in e).most_common()),
            }
    counts["sqlite_errors"] = sum("sqlite_error" in r for r in records)
    return counts


def markdown(result: dict) -> str:
    names = {"postgres": f"PostgreSQL {result['servers'].get('postgres', '').split(' ')[0]}",
             "mysql": f"MariaDB {result['servers'].get('mysql', '').split('-')[0]}"}
    lines = [f"Spider dev gold queries: {result['queries']} (SQLite errors: {result['counts']['sqlite_errors']})", "",
             "| target | translation | same rows | different, where SQLite's own answer depends on row order (ties) "
             "| different otherwise | error | top errors |", "|---|---|---|---|---|---|---|"]
    for dialect in result["servers"]:
        for mode, label in MODES.items():
            counts = result["counts"][f"{dialect}/{mode}"]
            v = counts["verdicts"]
            ties = counts["different_where_sqlite_depends_on_scan_order"]
            errors = ", ".join(f"{kind} {n}" for kind, n in list(counts["errors"].items())[:3])
            lines.append(f"| {names[dialect]} | {label} | {v.get('same', 0)} | {ties} | "
                         f"{v.get('different', 0) + v.get('order', 0) - ties} | {v.get('error', 0)} | {errors} |")
    engine_rows = [d for d in result["servers"] if f"{d}/duckdb-check" in result["counts"]]
    if engine_rows:
        lines += ["", "The app's check (DuckDB runs `to_engine` of the translation) against the real server:", "",
                  "| dialect | same rows | both error | engine errors, server runs | engine runs, server errors "
                  "| different, ties | different otherwise |", "|---|---|---|---|---|---|---|"]
        for dialect in engine_rows:
            check = result["counts"][f"{dialect}/duckdb-check"]
            a, ties = check["agreement"], check["different_where_sqlite_depends_on_scan_order"]
            lines.append(f"| {names[dialect]} | {a.get('same rows', 0)} | {a.get('both error', 0)} | "
                         f"{a.get('engine errors, server runs', 0)} | {a.get('engine runs, server errors', 0)} | "
                         f"{ties} | {a.get('different rows', 0) - ties} |")
    return "\n".join(lines)


def noteworthy(records: list[dict]) -> dict:
    """What is worth reading beyond the counts: each query translate(schema=) or the check did not get
    the same rows for, and three examples of every error kind of every target and mode."""
    examples: dict[str, list] = defaultdict(list)
    for record in records:
        for dialect in TARGETS:
            for mode, entry in record.get(dialect, {}).items():
                if "error" in entry and len(examples[f"{dialect}/{mode}/{entry['error']}"]) < 3:
                    examples[f"{dialect}/{mode}/{entry['error']}"].append(
                        {"index": record["index"], "sql": entry.get("sql"), "message": entry["message"]})
    kept = []
    for record in records:
        finals = [record[d] for d in TARGETS if d in record]
        if all(f["schema"]["verdict"] == "same" and f.get("engine", {}).get("agrees_with_server", "same rows")
               == "same rows" for f in finals):
            continue
        kept.append({**{k: v for k, v in record.items() if k not in TARGETS},
                     **{d: {k: v for k, v in record[d].items() if k in ("schema", "engine")}
                        for d in TARGETS if d in record}})
    return {"records": kept, "error_examples": dict(examples)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spider", type=Path, default=ROOT.parent / "shared" / "spider_dev",
                        help="Spider dev folder (dev_gold.sql and database/)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dialect_fidelity.json")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--limit", type=int, help="only the first N gold queries (a smoke run)")
    parser.add_argument("--no-duckdb", action="store_true", help="skip the DuckDB check of each translation")
    args = parser.parse_args(argv)
    if not (args.spider / "dev_gold.sql").is_file():
        parser.error(f"{args.spider} has no dev_gold.sql: point --spider at Spider's dev folder")
    sys.path.insert(0, str(ROOT / "tests"))
    import contextlib

    from servers import mariadb_server, postgres_server

    indices = None
    if args.limit:
        indices = {q["index"] for q in gold_queries(args.spider)[: args.limit]}
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        targets = {}
        if "postgres" in args.targets:
            targets["postgres"] = PostgresTarget(stack.enter_context(postgres_server()))
        if "mysql" in args.targets:
            targets["mysql"] = MysqlTarget(stack.enter_context(mariadb_server()))
        result = run_benchmark(args.spider, targets, duck=not args.no_duckdb, indices=indices)
        for target in targets.values():
            target.close()  # a server shuts down at once only when no client holds a connection
    result["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.update(noteworthy(result.pop("records")))
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(markdown(result))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
