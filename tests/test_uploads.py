"""Uploaded databases and data files: each kind answers queries on its real data in every engine,
read-only (the file's hash never changes, whatever the SQL tries), copied into the other engine once
per upload, and every bad file gets a message that says what to fix, with nothing kept."""

import hashlib
import json
import os
import sqlite3
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starsql.db import files
from starsql.db.files import UploadError
from starsql.db.workspace import open_workspace

PEOPLE = [(1, "Ann", "Oslo", 34), (2, "bob", "Rome", 27), (3, "ANNA", "Oslo", 41)]
QUERY = "SELECT name, age FROM people WHERE city = 'Oslo' ORDER BY age"
ANSWER = [["Ann", 34], ["ANNA", 41]]
WRITES = ["DELETE FROM people", "DROP TABLE people", "UPDATE people SET age = 0",
          "INSERT INTO people VALUES (9, 'x', 'y', 1)"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A cache of copies of its own per test: what a test finds there, it made."""
    monkeypatch.setattr(files, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def make_upload(directory, kind: str):
    """The same table, `people`, as each kind of upload."""
    if kind == "sqlite":
        path = directory / "people.sqlite"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, city TEXT, age INTEGER)")
        conn.executemany("INSERT INTO people VALUES (?, ?, ?, ?)", PEOPLE)
        conn.commit()
        conn.close()
    elif kind == "duckdb":
        path = directory / "people.duckdb"
        conn = duckdb.connect(str(path))
        conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name VARCHAR, city VARCHAR, age INTEGER)")
        conn.executemany("INSERT INTO people VALUES (?, ?, ?, ?)", PEOPLE)
        conn.close()
    elif kind == "csv":
        path = directory / "people.csv"
        path.write_text("id,name,city,age\n" + "".join(f"{i},{n},{c},{a}\n" for i, n, c, a in PEOPLE))
    elif kind == "parquet":
        path = directory / "people.parquet"
        pq.write_table(pa.table({k: [row[i] for row in PEOPLE] for i, k in enumerate(["id", "name", "city", "age"])}), path)
    else:
        path = directory / "people.jsonl"
        path.write_text("".join(json.dumps(dict(zip(["id", "name", "city", "age"], row))) + "\n" for row in PEOPLE))
    return path


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


KINDS = ["sqlite", "duckdb", "csv", "parquet", "jsonl"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_each_kind_answers_on_its_real_data(tmp_path, kind, dialect):
    path = make_upload(tmp_path, kind)
    ws = open_workspace("", dialect, database=str(path))
    try:
        assert ws.rows == 3
        assert [t.name for t in ws.tables] == ["people"]
        assert ws.schema_text.startswith("CREATE TABLE people (id INTEGER")
        result = ws.check(QUERY)
        assert result.valid and result.error is None, result.error
        assert result.rows == ANSWER and result.dialect == dialect
        if dialect == "postgres":  # DuckDB's meaning, whatever engine the file came from
            assert ws.check("SELECT count(*) FROM people WHERE name ILIKE 'ann%'").rows == [[2]]
            assert ws.check("SELECT count(*) FROM people WHERE name LIKE 'Ann%'").rows == [[1]]
    finally:
        ws.close()


@pytest.mark.parametrize("kind", ["sqlite", "duckdb", "csv"])
def test_writes_are_refused_and_the_file_never_changes(tmp_path, kind):
    folder = tmp_path / "upload"
    folder.mkdir()
    path = make_upload(folder, kind)
    before, neighbours = sha256(path), sorted(os.listdir(folder))
    for dialect in ("sqlite", "postgres"):  # each engine, on the file itself and on its copy
        ws = open_workspace("", dialect, database=path)
        try:
            for sql in WRITES:
                result = ws.check(sql)
                assert result.writes_data and result.rows is None and "not run" in result.error, (dialect, sql)
            assert ws.check("SELECT count(*), sum(age) FROM people").rows == [[3, 102]]
        finally:
            ws.close()
    assert sha256(path) == before
    assert sorted(os.listdir(folder)) == neighbours  # no journal, WAL or lock file beside it either


def test_a_live_sqlite_file_keeps_its_hash_too(tmp_path):
    """The sandbox's own guard, below the check: the file is open read-only and immutable."""
    from starsql.sandbox import open_limited

    path = make_upload(tmp_path, "sqlite")
    before = sha256(path)
    conn = open_limited(path=path)
    for sql in WRITES:
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            conn.execute(sql)
    conn.close()
    assert sha256(path) == before


def test_copy_into_the_other_engine_is_made_once_per_upload(tmp_path, cache_dir, monkeypatch):
    made = []
    real = files._sqlite_to_duckdb
    monkeypatch.setattr(files, "_sqlite_to_duckdb", lambda *args: made.append(args) or real(*args))
    path = make_upload(tmp_path, "sqlite")
    for _ in range(3):
        ws = open_workspace("", "postgres", database=path)
        assert ws.check(QUERY).rows == ANSWER
        ws.close()
    assert len(made) == 1
    assert [p.suffix for p in cache_dir.iterdir()] == [".duckdb"]
    # The same bytes uploaded again under another temporary path find the same copy.
    again = tmp_path / "again"
    again.mkdir()
    (again / "people.sqlite").write_bytes(path.read_bytes())
    open_workspace("", "postgres", database=again / "people.sqlite").close()
    assert len(made) == 1


def test_several_data_files_are_one_table_each(tmp_path):
    people = make_upload(tmp_path, "csv")
    pq.write_table(pa.table({"person_id": [1, 1, 3], "day": ["2024-01-02", "2024-01-03", "2024-02-01"]}),
                   tmp_path / "visits 2024.parquet")
    ws = open_workspace("", "postgres", database=[people, tmp_path / "visits 2024.parquet"])
    try:
        assert [t.name for t in ws.tables] == ["people", "visits_2024"]
        result = ws.check("SELECT p.name, count(*) FROM people p JOIN visits_2024 v ON v.person_id = p.id "
                          "WHERE v.day::date >= DATE '2024-01-03' GROUP BY p.name ORDER BY p.name")
        assert result.rows == [["ANNA", 1], ["Ann", 1]], result.error
    finally:
        ws.close()


def test_spider_database_in_another_dialect(spider_dir):
    """A real SQLite database with mixed-type columns, checked as PostgreSQL on its DuckDB copy."""
    path = spider_dir / "database" / "concert_singer" / "concert_singer.sqlite"
    before = sha256(path)
    ws = open_workspace("", "postgres", database=path)
    try:
        result = ws.check("SELECT name, age FROM singer WHERE country ILIKE 'france' ORDER BY age DESC")
        assert result.rows == [["John Nizinik", 43], ["Rose White", 41], ["Justin Brown", 29], ["Tribal King", 25]]
        assert "FOREIGN KEY" in ws.schema_text  # keys from the file itself
    finally:
        ws.close()
    assert sha256(path) == before


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[100:] = bytes(len(data) - 100)  # header intact, every page after it zeroed
    path.write_bytes(bytes(data))


def _encrypted(path):
    # What SQLCipher writes: no plain header, every byte scrambled.
    path.write_bytes(bytes(b ^ 0xA5 for b in path.read_bytes()))


BAD_FILES = {
    "not a database": ("notes.sqlite", lambda p: p.write_text("just some text\n" * 50), "is not a SQLite database"),
    "0 bytes": ("empty.db", lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    "0-byte csv": ("empty.csv", lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    "ragged csv": ("ragged.csv", lambda p: p.write_text("a,b,c\n1,2,3\n4,5\n6,7,8\n"),
                   "line 3 has 2 values but the header has 3"),
    "corrupt sqlite": ("broken.sqlite", None, "damaged"),
    "encrypted sqlite": ("secret.db", None, "or it is encrypted"),
    "unsupported extension": ("people.xlsx", lambda p: p.write_bytes(b"PK\x03\x04"), "unsupported file type '.xlsx'"),
    "not duckdb": ("data.duckdb", lambda p: p.write_text("id,name\n1,x\n"), "is not a DuckDB database"),
    "bad parquet": ("data.parquet", lambda p: p.write_bytes(b"PAR1 not really"), "cannot be read as Parquet"),
    "bad json lines": ("data.jsonl", lambda p: p.write_text('{"a": 1}\nnot json\n'), "cannot be read as JSON lines"),
    "not utf-8 csv": ("latin.csv", lambda p: p.write_bytes("name\ncaf\xe9\n".encode("latin-1")), "is not UTF-8 text"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_say_what_to_fix_and_keep_nothing(tmp_path, cache_dir, name):
    filename, write, words = BAD_FILES[name]
    path = tmp_path / filename
    if write is None:
        made = make_upload(tmp_path, "sqlite")
        (_corrupt if "corrupt" in name else _encrypted)(made)
        made.rename(path)
    else:
        write(path)
    for dialect in ("sqlite", "postgres"):
        with pytest.raises(UploadError, match=words) as raised:
            open_workspace("", dialect, database=path)
        assert filename in str(raised.value)
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


def test_too_large_a_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MAX_UPLOAD_BYTES", 1000)
    path = tmp_path / "big.csv"
    path.write_text("x\n" + "1\n" * 1000)
    with pytest.raises(UploadError, match="2,002 bytes, over the limit of 1,000 bytes per file"):
        open_workspace("", "sqlite", database=path)


def test_limits_hold_on_uploaded_data(tmp_path):
    path = tmp_path / "numbers.duckdb"
    conn = duckdb.connect(str(path))
    conn.execute("CREATE TABLE numbers AS SELECT range AS n FROM range(1000)")
    conn.close()
    ws = open_workspace("", "duckdb", database=path, seconds=1.0)
    try:
        result = ws.check("SELECT n FROM numbers ORDER BY n", max_rows=3)
        assert result.rows == [[0], [1], [2]] and result.truncated
        start = time.monotonic()
        result = ws.check("SELECT count(*) FROM numbers, range(CAST(1e12 AS BIGINT))")
        assert time.monotonic() - start < 2.0 and "Stopped after 1 s" in result.error
    finally:
        ws.close()


def test_requests_in_different_dialects_share_a_file_at_once(tmp_path):
    """Each workspace is its own DuckDB instance: its dialect's settings and lock are its own."""
    path = make_upload(tmp_path, "duckdb")
    postgres = open_workspace("", "postgres", database=path)
    mysql = open_workspace("", "mysql", database=path)
    try:
        assert postgres.check("SELECT age / 10 FROM people WHERE id = 1").rows == [[3]]  # integer division
        assert mysql.check("SELECT age / 10 FROM people WHERE id = 1").rows == [[3.4]]
    finally:
        postgres.close()
        mysql.close()


def test_an_uploaded_duckdb_files_views_never_read_server_files(tmp_path, cache_dir, monkeypatch):
    """A view is the uploader's SQL: copying it into SQLite (or listing it) runs it with files locked away."""
    monkeypatch.setenv("STARSQL_TEST_SECRET", "s3cr3t-env-value")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-file-value")
    path = tmp_path / "views.duckdb"
    conn = duckdb.connect(str(path))
    conn.execute("CREATE TABLE people (id INTEGER, name VARCHAR)")
    conn.execute("INSERT INTO people VALUES (1, 'Ann')")
    conn.execute("CREATE VIEW env AS SELECT content FROM read_text('/proc/self/environ')")
    conn.execute(f"CREATE VIEW secret AS SELECT content FROM read_text('{secret}')")
    conn.execute(f"CREATE VIEW listing AS SELECT * FROM glob('{tmp_path}/*')")
    conn.close()
    for dialect in ("sqlite", "postgres"):
        try:
            ws = open_workspace("", dialect, database=path)
        except UploadError as error:
            assert dialect == "sqlite" and "`env`" in str(error) and "s3cr3t" not in str(error), error
            continue
        try:
            for view in ("env", "secret", "listing"):
                result = ws.check(f"SELECT * FROM {view}")
                assert "s3cr3t" not in repr(result.rows) and "secret.txt" not in repr(result.rows), (dialect, view)
        finally:
            ws.close()
    for copy in cache_dir.glob("*") if cache_dir.exists() else []:
        assert b"s3cr3t" not in copy.read_bytes() and b"secret.txt" not in copy.read_bytes()


class PeakMemory:
    """The largest growth of this process's resident memory while the block runs (sampled)."""

    def __enter__(self):
        import threading

        import psutil

        process, self.done, self.growth = psutil.Process(), threading.Event(), 0
        start = process.memory_info().rss

        def sample():
            while not self.done.wait(0.005):
                self.growth = max(self.growth, process.memory_info().rss - start)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def test_a_view_that_builds_gigabytes_is_refused_without_the_apps_memory(tmp_path):
    """A few KB of file, a view of 30 values of 100 MB each: copying it gives a clear error fast, and
    the app's process never holds those values (SQLite's value length; DuckDB's in its worker)."""
    sqlite_bomb = tmp_path / "bomb.sqlite"
    conn = sqlite3.connect(sqlite_bomb)
    conn.execute("CREATE TABLE t (a INTEGER)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("CREATE VIEW big AS WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c LIMIT 30) "
                 "SELECT randomblob(100000000) AS b FROM c")
    conn.commit()
    conn.close()
    duckdb_bomb = tmp_path / "bomb.duckdb"
    conn = duckdb.connect(str(duckdb_bomb))
    conn.execute("CREATE TABLE t (a INTEGER)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("CREATE VIEW big AS SELECT repeat('x', 100000000) AS b FROM range(30)")
    conn.close()
    for path, dialect, words in [(sqlite_bomb, "postgres", "could not be copied into DuckDB: a value is longer"),
                                 (duckdb_bomb, "sqlite", "could not be copied into SQLite: .*memory")]:
        start = time.monotonic()
        with PeakMemory() as peak, pytest.raises(UploadError, match=words):
            open_workspace("", dialect, database=path)
        assert time.monotonic() - start < 10.0, path
        assert peak.growth < 200 * 2**20, (path, peak.growth)


def test_a_slow_copy_delays_no_other_upload_and_a_failed_one_is_not_retried(tmp_path, monkeypatch):
    import threading

    cached = make_upload(tmp_path, "csv")  # its DuckDB copy made before the slow one starts
    open_workspace("", "postgres", database=cached).close()
    slow = make_upload(tmp_path, "sqlite")
    copying, release = threading.Event(), threading.Event()
    real = files._sqlite_to_duckdb

    def slow_copy(*args):
        copying.set()
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(files, "_sqlite_to_duckdb", slow_copy)
    other = threading.Thread(target=lambda: open_workspace("", "postgres", database=slow).close())
    other.start()
    try:
        assert copying.wait(10)
        start = time.monotonic()
        ws = open_workspace("", "postgres", database=cached)
        assert time.monotonic() - start < 2.0
        assert ws.check(QUERY).rows == ANSWER
        ws.close()
    finally:
        release.set()
        other.join()
    # A copy that runs out of time says so and what to do, once: the next request gets the answer at once.
    monkeypatch.setattr(files, "_sqlite_to_duckdb", real)
    monkeypatch.setattr(files, "PREPARE_LIMIT_S", 0.3)
    path = tmp_path / "slow_view.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (a INTEGER)")
    conn.execute("CREATE VIEW v AS WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c) "
                 "SELECT count(*) AS n FROM c")
    conn.commit()
    conn.close()
    for attempt in range(2):
        start = time.monotonic()
        with pytest.raises(UploadError, match=r"took longer than the limit of 0.3 s.*Choose the dialect sqlite"):
            open_workspace("", "postgres", database=path)
        assert time.monotonic() - start < (5.0 if attempt == 0 else 0.2)
