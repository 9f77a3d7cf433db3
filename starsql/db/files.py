"""Uploaded databases: a SQLite file (.sqlite/.db), a DuckDB file (.duckdb), or data files (CSV,
Parquet, JSON lines: one table per file, named after the file, read through DuckDB).

An upload is looked at once (its SHA-256 names it): a database file's header, integrity and tables;
data files are read into a DuckDB file. When the dialect's engine is not the one that reads the
upload as it is (a SQLite file checked as PostgreSQL runs on DuckDB; a DuckDB file checked as SQLite
on SQLite), the data is copied into that engine's file once, in a cache under the temp directory, and
every later request opens that copy. Engines open files read-only; the uploaded file itself is never
written, and a bad file raises UploadError before anything is kept.

An upload's views are the uploader's SQL, and a copy runs them: a DuckDB file is locked (no files,
extensions or settings) before anything reads it, and copied into SQLite in duck.py's address-capped
worker process; a SQLite file is read with a cap on a value's length, in batches bounded by bytes.
A copy that fails is remembered (a retry would fail alike), and one being made delays no other.
"""

import copy
import csv
import datetime
import decimal
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from ..sandbox import Budget, read_only_uri, time_limit
from ..schema import Table, render_table, sqlite_tables
from . import duck

MAX_UPLOAD_BYTES = 50 * 2**20  # one uploaded file
MAX_FILES = 20  # data files in one upload
PREPARE_LIMIT_S = 30.0  # once per upload: checking a file, reading data files, copying into the other engine
MAX_COPY_BYTES = 4 * MAX_UPLOAD_BYTES  # a copy in the other engine's format
MAX_CACHE_BYTES = 2 * 2**30  # all copies together; the oldest go first
# One per user; "v2": copies made before uploads' views were locked away from files are never served.
CACHE_DIR = Path(tempfile.gettempdir()) / f"starsql-uploads-v2-{getattr(os, 'getuid', lambda: 0)()}"
MAX_REMEMBERED = 256  # uploads whose check and hash are kept in memory
BATCH_ROWS = 10_000  # rows per step of a copy: memory stays small whatever the table's size
BATCH_BYTES = 16 * 2**20  # ... and bytes of text and blobs per step, whatever the values' size
MAX_VALUE_BYTES = MAX_UPLOAD_BYTES  # one value a copy reads (no stored value is longer; a view's may be)

DATABASE_SUFFIXES = {".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite", ".duckdb": "duckdb"}
DATA_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SQLITE_HEADER = b"SQLite format 3\x00"
DUCKDB_MAGIC = b"DUCK"  # bytes 8-11 of a DuckDB file


class UploadError(ValueError):
    """What is wrong with an uploaded file and what to do; nothing of it was kept."""


@dataclass
class Upload:
    """One upload, checked: the engine that reads it as uploaded ("sqlite" or "duckdb"), its tables
    (as the prompt shows them, keys included) and the files behind it."""
    key: str  # SHA-256 of the files' names and contents
    native: str
    tables: list[Table]
    paths: list[Path]
    data_files: bool  # CSV/Parquet/JSON lines (their DuckDB file is a copy in the cache)


_checked: dict[str, tuple[str, list[Table]]] = {}  # key -> (native engine, tables): each upload is read once
_hashes: dict[tuple, str] = {}  # (path, size, mtime) -> SHA-256
_failed: dict[str, UploadError] = {}  # copy's name -> why it failed: a retry would fail alike, after as long
_copy_locks: dict[str, threading.Lock] = {}  # copy's name -> held while it is made: one copy at a time per file
_memory_lock, _evict_lock = threading.Lock(), threading.Lock()


def _size_text(n: int) -> str:
    return f"{n / 2**20:g} MB" if n >= 2**20 else f"{n:,} bytes"


def table_name(path: Path) -> str:
    """A data file's table: its name without the extension, in letters, digits and underscores."""
    name = re.sub(r"\W+", "_", path.stem).strip("_") or "data"
    return "t_" + name if name[0].isdigit() else name


def _paths(database) -> list[Path]:
    items = database if isinstance(database, (list, tuple)) else [database]
    paths = [Path(getattr(item, "path", None) or getattr(item, "name", None) or item)
             if not isinstance(item, (str, Path)) else Path(item) for item in items]
    if not paths:
        raise UploadError("No file was uploaded.")
    return paths


def _check_file(path: Path) -> str:
    """The file's kind by its extension, after the checks every upload gets."""
    kind = DATABASE_SUFFIXES.get(path.suffix.lower()) or DATA_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(DATABASE_SUFFIXES) + sorted(DATA_SUFFIXES))
        raise UploadError(f"`{path.name}`: unsupported file type {path.suffix or '(no extension)'!r}; "
                          f"upload one of {known}.")
    if not path.is_file():
        raise UploadError(f"`{path.name}` was not found; upload it again.")
    size = path.stat().st_size
    if size == 0:
        raise UploadError(f"`{path.name}` is empty (0 bytes); upload the file with its data.")
    if size > MAX_UPLOAD_BYTES:
        raise UploadError(f"`{path.name}` is {size:,} bytes, over the limit of {_size_text(MAX_UPLOAD_BYTES)} per "
                          "file: upload a smaller extract of the data.")
    return kind


def _sha256(path: Path) -> str:
    stat = path.stat()
    known = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if known not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(2**20):
                digest.update(chunk)
        _remember(_hashes, known, digest.hexdigest())
    return _hashes[known]


def _remember(memory: dict, key, value) -> None:
    with _memory_lock:
        memory[key] = value
        while len(memory) > MAX_REMEMBERED:
            memory.pop(next(iter(memory)))


def read_upload(database) -> Upload:
    """Check an upload (a path, or a list of data file paths) and read its tables; the work is done
    once per upload, later calls find it by the files' hash. Raises UploadError."""
    paths = _paths(database)
    kinds = [_check_file(path) for path in paths]
    database_files = [p for p, kind in zip(paths, kinds) if kind in ("sqlite", "duckdb")]
    if database_files and len(paths) > 1:
        raise UploadError("Upload one database file (.sqlite, .db or .duckdb) on its own, or data files "
                          "(CSV, Parquet, JSON lines), not several files with a database.")
    if len(paths) > MAX_FILES:
        raise UploadError(f"{len(paths)} files were uploaded; at most {MAX_FILES} data files are accepted.")
    names = [table_name(p) for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if not database_files and twice:
        raise UploadError(f"Several files would become table `{twice[0]}`: rename them so each file name is different.")
    digest = hashlib.sha256()
    for path, kind, name in zip(paths, kinds, names):
        digest.update(f"{kind}:{name}:{_sha256(path)};".encode())
    key = digest.hexdigest()
    if key not in _checked:
        if kinds[0] == "sqlite":
            _remember(_checked, key, ("sqlite", _inspect_sqlite(paths[0])))
        elif kinds[0] == "duckdb":
            _remember(_checked, key, ("duckdb", _inspect_duckdb(paths[0])))
        else:
            read = _build(key, "duckdb", lambda target: _data_to_duckdb(paths, kinds, names, target))
            _remember(_checked, key, ("duckdb", _duckdb_tables(read)))
    native, tables = _checked[key]
    return Upload(key, native, copy.deepcopy(tables), paths, data_files=not database_files)  # tables: the caller's to change


def engine_file(upload: Upload, engine: str) -> Path:
    """The file `engine` ("sqlite" or "duckdb") opens read-only for this upload: the uploaded
    database itself, or its copy in that engine's format, made on first use."""
    if engine == upload.native and not upload.data_files:
        return upload.paths[0]
    source = upload.paths[0]
    if upload.data_files:  # read into DuckDB first (again, if the cache dropped that copy)
        source = _build(upload.key, "duckdb", lambda target: _data_to_duckdb(
            upload.paths, [_check_file(p) for p in upload.paths], [table_name(p) for p in upload.paths], target))
        if engine == "duckdb":
            return source
    if engine == "duckdb":
        return _build(upload.key, "duckdb", lambda target: _sqlite_to_duckdb(source, upload.tables, target))
    return _build(upload.key, "sqlite", lambda target: _duckdb_to_sqlite(source, upload.tables, target))


# ---------------------------------------------------------------------------------------------
# Checking database files


def _header(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read(16)


def _open_sqlite(path: Path) -> sqlite3.Connection:
    """Read-only and immutable (nothing is written beside it), like the sandbox's open_limited(path=...)
    but with a value length only an upload's own values need: a view (the uploader's SQL) cannot
    build a gigabyte of randomblob() in the app's memory."""
    conn = sqlite3.connect(read_only_uri(path), uri=True, check_same_thread=False)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    return conn


def _inspect_sqlite(path: Path) -> list[Table]:
    header = _header(path)
    if header != SQLITE_HEADER:
        if header[8:12] == DUCKDB_MAGIC:
            raise UploadError(f"`{path.name}` is a DuckDB database, not SQLite: rename it to end in .duckdb.")
        raise UploadError(f"`{path.name}` is not a SQLite database (or it is encrypted): upload an unencrypted "
                          "SQLite file (.sqlite or .db), or export the data as CSV or Parquet.")
    conn = _open_sqlite(path)
    try:
        with time_limit(conn, Budget(PREPARE_LIMIT_S)):
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise UploadError(f"`{path.name}` is a damaged SQLite database ({'; '.join(problems)[:300]}): "
                                  "upload an intact copy (sqlite3 file.db .recover can rescue data).")
            tables = sqlite_tables(conn)
    except sqlite3.Error as error:
        if "interrupted" in str(error):
            raise UploadError(f"Checking `{path.name}` took longer than {PREPARE_LIMIT_S:g} s: upload a smaller "
                              "database.") from None
        raise UploadError(f"`{path.name}` cannot be read as a SQLite database ({error}): it may be damaged, "
                          "encrypted or still being written; upload an intact, unencrypted copy.") from None
    finally:
        conn.close()
    if not tables:
        raise UploadError(f"`{path.name}` has no tables: upload a database with data.")
    return tables


def _open_duckdb(path: Path) -> duckdb.DuckDBPyConnection:
    """The uploaded DuckDB file, read-only and locked before anything reads it: its views are the
    uploader's SQL, and run with no access to files, extensions or settings."""
    conn = duck.open_duck(path)
    try:
        duck.lock(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _duckdb_tables(path: Path) -> list[Table]:
    conn = _open_duckdb(path)
    try:
        return duck.duck_tables(conn)
    finally:
        conn.close()


def _inspect_duckdb(path: Path) -> list[Table]:
    if _header(path)[8:12] != DUCKDB_MAGIC:
        hint = " It is a SQLite file: rename it to end in .sqlite." if _header(path) == SQLITE_HEADER else ""
        raise UploadError(f"`{path.name}` is not a DuckDB database.{hint or ' Upload a file that DuckDB wrote.'}")
    try:
        tables = _duckdb_tables(path)
    except duckdb.Error as error:
        raise UploadError(f"`{path.name}` cannot be read as a DuckDB database ({duck.message(error, Budget(0))}): "
                          "it may be damaged, encrypted or written by a newer DuckDB.") from None
    if not tables:
        raise UploadError(f"`{path.name}` has no tables in its main schema: upload a database with data.")
    return tables


# ---------------------------------------------------------------------------------------------
# Copies, made once per upload and engine


def _build(key: str, engine: str, write) -> Path:
    """CACHE_DIR/<key>.<engine>, written by `write(temporary path)` unless it is there already; a
    failed write leaves nothing behind."""
    target = CACHE_DIR / f"{key}.{engine}"
    with _memory_lock:
        lock = _copy_locks.setdefault(str(target), threading.Lock())
    while True:  # a copy in the cache, or a copy that failed, is answered without waiting for another's
        if str(target) in _failed:
            raise UploadError(str(_failed[str(target)]))
        try:
            os.utime(target)  # recently used: evicted last
            return target
        except FileNotFoundError:
            pass
        if lock.acquire(timeout=0.05):
            break
    try:
        if str(target) in _failed:  # failed while this request waited
            raise UploadError(str(_failed[str(target)]))
        if target.exists():  # made while this request waited
            return target
        CACHE_DIR.mkdir(mode=0o700, exist_ok=True)
        temporary = CACHE_DIR / f"{key}.{os.getpid()}.tmp.{engine}"
        try:
            write(temporary)
            os.replace(temporary, target)
        except UploadError as error:
            _remember(_failed, str(target), error)
            raise
        finally:
            for leftover in (temporary, Path(f"{temporary}.wal")):
                leftover.unlink(missing_ok=True)
    finally:
        lock.release()
    with _evict_lock:
        _evict(keep=target)
    return target


def _evict(keep: Path) -> None:
    files = []
    for path in CACHE_DIR.iterdir():
        try:  # another process may evict the same file meanwhile
            if ".tmp." not in path.name:
                files.append((path.stat().st_mtime, path.stat().st_size, path))
        except FileNotFoundError:
            pass
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= MAX_CACHE_BYTES:
            break
        if path != keep:
            total -= size
            path.unlink(missing_ok=True)


class _Deadline:
    def __init__(self, what: str, seconds: float | None = None):
        self.what, self.end = what, time.monotonic() + (PREPARE_LIMIT_S if seconds is None else seconds)

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise UploadError(f"Reading {self.what} took longer than {PREPARE_LIMIT_S:g} s: upload a smaller extract.")

    def budget(self) -> Budget:
        return Budget(max(0.0, self.end - time.monotonic()))


def _batches(cursor, deadline: _Deadline, what: str):
    """The cursor's rows in lists of at most BATCH_ROWS rows and about BATCH_BYTES of text and blobs;
    UploadError once the rows together pass MAX_COPY_BYTES or the deadline."""
    batch, size, total = [], 0, 0
    for row in cursor:
        batch.append(row)
        size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)
        if len(batch) >= BATCH_ROWS or size >= BATCH_BYTES:
            total += size
            if total > MAX_COPY_BYTES:
                raise UploadError(f"{what}: the copy exceeds {_size_text(MAX_COPY_BYTES)}; upload a smaller extract.")
            deadline.check()
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _copy_connection(path: Path) -> duckdb.DuckDBPyConnection:
    """A writable DuckDB file for a copy, with the sandbox's memory limit; only our own SQL runs on it."""
    return duckdb.connect(str(path), config={"memory_limit": f"{duck.MAX_MEMORY_BYTES // 2**20}MB",
                                             "threads": duck.THREADS, "temp_directory": "",
                                             "autoload_known_extensions": False, "autoinstall_known_extensions": False})


def _csv_delimiter(path: Path) -> str:
    if path.suffix.lower() == ".tsv":
        return "\t"
    with open(path, newline="", encoding="utf-8", errors="replace") as file:
        sample = file.read(64 * 1024)
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _check_csv(path: Path, delimiter: str, deadline: _Deadline) -> None:
    """Every row has as many values as the header (DuckDB's reader would guess around ragged rows)."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.reader(file, delimiter=delimiter)
            header = next(reader, None)
            if not header or not any(cell.strip() for cell in header):
                raise UploadError(f"`{path.name}` has no header row: its first line must name the columns.")
            for number, record in enumerate(reader):
                if record and len(record) != len(header):
                    raise UploadError(
                        f"`{path.name}` line {reader.line_num} has {len(record)} values but the header has "
                        f"{len(header)}: make every row have the same number of columns (quote values that "
                        f"contain {'a tab' if delimiter == chr(9) else repr(delimiter)}).")
                if number % 100_000 == 0:
                    deadline.check()
    except UnicodeDecodeError as error:
        raise UploadError(f"`{path.name}` is not UTF-8 text (byte {error.start + 1}): save it as UTF-8 CSV.") from None
    except csv.Error as error:
        raise UploadError(f"`{path.name}` is not a readable CSV file ({error}): upload CSV text.") from None


def _data_to_duckdb(paths: list[Path], kinds: list[str], names: list[str], target: Path) -> None:
    deadline = _Deadline("the data files")
    conn = _copy_connection(target)
    try:
        for path, kind, name in zip(paths, kinds, names):
            if kind == "csv":
                delimiter = _csv_delimiter(path)
                _check_csv(path, delimiter, deadline)
                reader = "read_csv(?, delim = ?, header = true, quote = '\"', escape = '\"', sample_size = -1)"
                parameters = [str(path), delimiter]
            elif kind == "parquet":
                reader, parameters = "read_parquet(?)", [str(path)]
            else:
                reader, parameters = "read_json(?, format = 'newline_delimited')", [str(path)]
            try:
                with duck.time_limit(conn, deadline.budget()):
                    conn.execute(f"CREATE TABLE {duck.quote(name)} AS SELECT * FROM {reader}", parameters)
            except duckdb.InterruptException:
                raise UploadError(f"Reading `{path.name}` took longer than {PREPARE_LIMIT_S:g} s: upload a smaller "
                                  "extract.") from None
            except (duckdb.Error, MemoryError) as error:
                what = {"csv": "CSV", "parquet": "Parquet", "jsonl": "JSON lines (one JSON object per line)"}[kind]
                raise UploadError(f"`{path.name}` cannot be read as {what}: "
                                  f"{duck.message(error, deadline.budget()).rstrip('.')}. Check the file's format.") from None
    finally:
        conn.close()


def _column_plan(conn: sqlite3.Connection, table: Table) -> tuple[list[str | None], bool]:
    """The DuckDB type of each column of a SQLite table, from the values it holds (SQLite lets a
    column mix types): text anywhere -> VARCHAR, else blobs -> BLOB, reals -> DOUBLE, integers ->
    BIGINT; None for a column of NULLs. Also: whether some blob must be read as text."""
    flags = ", ".join(f"max(typeof({duck.quote(c.name)}) = '{kind}')"
                      for c in table.columns for kind in ("text", "blob", "real", "integer"))
    row = conn.execute(f"SELECT {flags} FROM {duck.quote(table.name)}").fetchone()
    plan, blob_as_text = [], False
    for index in range(len(table.columns)):
        text, blob, real, integer = (row[4 * index + i] for i in range(4))
        plan.append("VARCHAR" if text or (blob and (real or integer)) else "BLOB" if blob else "DOUBLE" if real
                    else "BIGINT" if integer else None)
        blob_as_text |= bool(blob and plan[-1] == "VARCHAR")
    return plan, blob_as_text


_ARROW = {"VARCHAR": pa.string(), "BLOB": pa.binary(), "DOUBLE": pa.float64(), "BIGINT": pa.int64(), None: pa.null()}
# SQLite converts each value to its column's type as it reads it, faster than Python would.
_READ_AS = {"VARCHAR": "CAST({} AS TEXT)", "DOUBLE": "CAST({} AS REAL)", "BIGINT": "{}", "BLOB": "{}", None: "NULL"}
# Declared types whose text values become real DATE/TIMESTAMP/BOOLEAN columns when every value converts.
_TYPED_TEXT = [(re.compile(r"(?i)^date$"), "DATE"), (re.compile(r"(?i)datetime|timestamp"), "TIMESTAMP"),
               (re.compile(r"(?i)bool"), "BOOLEAN")]


# What to do when a copy into the other engine fails: the engine that reads the upload as it is needs none.
_COPY_TO_DUCKDB_FIX = ("Choose the dialect sqlite (it checks SQL on the file itself), or upload the data as CSV "
                       "or Parquet.")
_COPY_TO_SQLITE_FIX = ("Choose a dialect other than sqlite (they check SQL on the data in DuckDB, with no copy), "
                       "or upload a smaller extract.")


def _sqlite_to_duckdb(source: Path, tables: list[Table], target: Path) -> None:
    deadline = _Deadline(f"`{source.name}` into DuckDB")
    src, conn = _open_sqlite(source), _copy_connection(target)
    try:
        with time_limit(src, deadline.budget(), steps=100_000):  # our own reads: a cheaper check
            for table in tables:
                plan, blob_as_text = _column_plan(src, table)
                types = [kind or duck.engine_type(conn, column.type) for kind, column in zip(plan, table.columns)]
                conn.execute(f"CREATE TABLE {duck.quote(table.name)} ("
                             + ", ".join(f"{duck.quote(c.name)} {t}" for c, t in zip(table.columns, types)) + ")")
                src.text_factory = (lambda b: b.decode(errors="replace")) if blob_as_text else str
                select = ", ".join(_READ_AS[kind].format(duck.quote(c.name)) for kind, c in zip(plan, table.columns))
                cursor = src.execute(f"SELECT {select} FROM {duck.quote(table.name)}")
                for batch in _batches(cursor, deadline, f"`{source.name}` could not be copied into DuckDB"):
                    columns = zip(*batch)
                    conn.register("starsql_rows", pa.table({f"c{i}": pa.array(values, _ARROW[kind])
                                                            for i, (kind, values) in enumerate(zip(plan, columns))}))
                    conn.execute(f"INSERT INTO {duck.quote(table.name)} SELECT * FROM starsql_rows")
                    conn.unregister("starsql_rows")
                _type_text_columns(conn, table, types)
    except sqlite3.Error as error:
        if "too big" in str(error):
            error = f"a value is longer than {_size_text(MAX_VALUE_BYTES)} (a view that builds it?)"
        elif "interrupted" in str(error):
            error = _took_too_long().rstrip(".")
        raise UploadError(f"`{source.name}` could not be copied into DuckDB: {error}. {_COPY_TO_DUCKDB_FIX}") from None
    except (duckdb.Error, MemoryError) as error:
        raise UploadError(f"`{source.name}` could not be copied into DuckDB: {duck.message(error, Budget(0))}. "
                          f"{_COPY_TO_DUCKDB_FIX}") from None
    finally:
        src.close()
        conn.close()


def _type_text_columns(conn: duckdb.DuckDBPyConnection, table: Table, types: list[str]) -> None:
    """A text column declared DATE, DATETIME/TIMESTAMP or BOOLEAN becomes that type when all its
    values convert: PostgreSQL-like SQL then compares and extracts as on the user's server."""
    name = duck.quote(table.name)
    for column, kind in zip(table.columns, types):
        target = next((t for pattern, t in _TYPED_TEXT if pattern.search(column.type or "")), None)
        if target is None or kind == target or kind not in ("VARCHAR", "BIGINT"):
            continue
        quoted = duck.quote(column.name)
        failing = conn.execute(f"SELECT count(*) FROM {name} WHERE {quoted} IS NOT NULL "
                               f"AND TRY_CAST({quoted} AS {target}) IS NULL").fetchone()[0]
        if not failing:
            conn.execute(f"ALTER TABLE {name} ALTER {quoted} TYPE {target}")


def _sqlite_value(value):
    """A DuckDB value as SQLite stores it."""
    if value is None or isinstance(value, (int, float, str, bytes)):
        return int(value) if isinstance(value, bool) else value
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _duckdb_to_sqlite(source: Path, tables: list[Table], target: Path) -> None:
    """duckdb_to_sqlite in a DuckDB worker process (duck.py): a view's one call that builds
    gigabytes (repeat('x', 1e8) over rows), outside DuckDB's memory limit, ends that process, not the app."""
    budget = Budget(PREPARE_LIMIT_S)
    worker = duck.take_worker()
    try:
        reply, value = worker.call(budget, "to_sqlite", source, tables, target, PREPARE_LIMIT_S)
    except duck.WorkerStopped as stopped:
        raise UploadError(f"`{source.name}` could not be copied into SQLite: "
                          + (_took_too_long() if stopped.why == "time" else f"{stopped}.")
                          + f" {_COPY_TO_SQLITE_FIX}") from None
    duck.give_back(worker)
    if reply != "ok":
        raise UploadError(value)


def _took_too_long() -> str:
    return f"it took longer than the limit of {PREPARE_LIMIT_S:g} s for a copy."


def duckdb_to_sqlite(source: Path, tables: list[Table], target: Path, seconds: float) -> None:
    """The DuckDB file `source` (its `tables`) copied into a new SQLite file `target`, within `seconds`."""
    deadline = _Deadline(f"`{source.name}` into SQLite", seconds)
    src, conn = _open_duckdb(source), sqlite3.connect(target, isolation_level=None)
    try:
        conn.execute(f"PRAGMA max_page_count = {MAX_COPY_BYTES // 4096}")
        conn.execute("BEGIN")
        with duck.time_limit(src, deadline.budget()):
            for table in tables:
                conn.execute(render_table(table))  # the prompt's CREATE TABLE: SQLite-style types and keys
                try:
                    cursor = src.execute(f"SELECT * FROM {duck.quote(table.name)}")
                except duckdb.PermissionException:
                    raise UploadError(f"`{source.name}`: view `{table.name}` reads files, extensions or settings, "
                                      "which an upload's SQL may not: drop the view (or store its rows as a table) "
                                      f"and upload again. {_COPY_TO_SQLITE_FIX}") from None
                marks = ", ".join("?" * len(table.columns))
                rows = (row for chunk in iter(lambda: cursor.fetchmany(1024), []) for row in chunk)
                for batch in _batches(rows, deadline, f"`{source.name}` could not be copied into SQLite"):
                    conn.executemany(f"INSERT INTO {duck.quote(table.name)} VALUES ({marks})",
                                     [[_sqlite_value(v) for v in row] for row in batch])
        conn.execute("COMMIT")
    except sqlite3.Error as error:
        full = "database or disk is full" in str(error)
        raise UploadError(f"`{source.name}` could not be copied into SQLite: "
                          + (f"the copy exceeds {_size_text(MAX_COPY_BYTES)}." if full else f"{error}.")
                          + f" {_COPY_TO_SQLITE_FIX}") from None
    except (duckdb.Error, MemoryError) as error:
        why = _took_too_long() if isinstance(error, duckdb.InterruptException) else duck.message(error, Budget(0)) + "."
        raise UploadError(f"`{source.name}` could not be copied into SQLite: {why} {_COPY_TO_SQLITE_FIX}") from None
    finally:
        src.close()
        conn.close()
