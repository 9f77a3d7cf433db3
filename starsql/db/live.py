"""A live database the user already runs: PostgreSQL, MySQL/MariaDB, SQLite or DuckDB, by URL.

    db = connect("postgresql://user:password@host:5432/shop")
    db.tables()                                   # tables and views, columns, types, keys
    db.run("SELECT ...", seconds=2, max_rows=50)  # (columns, rows, truncated)

PostgreSQL and MySQL/MariaDB go through SQLAlchemy (its connection pool and inspector) with psycopg
and pymysql, SQLite through SQLAlchemy on read-only (`mode=ro`) connections, DuckDB through its own
Python API in the DuckDB sandbox's worker processes (starsql/db/duck.py, read-only). Every query must be one SELECT
(sqlglot reads it first: anything else is refused before it reaches the server), runs in a read-only
transaction under a statement timeout that the server enforces, is read through a streaming cursor
no further than max_rows + 1 rows, and is always rolled back. Whatever goes wrong becomes a LiveError
that says what to fix; the URL's password never appears in it, nor in any repr. One pool per URL
serves every request (`connect` is called per request; `close_all` at shutdown).
"""

import contextlib
import math
import re
import sqlite3
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from urllib.parse import quote, unquote

import sqlglot
from sqlglot import exp

from ..sandbox import Budget, authorizer, read_only_authorizer, time_limit
from ..serve.check import fetch_capped, parse, statement_kind
from ..schema import Column, ForeignKey, Table, sqlite_tables
from .dumps import sqlite_type as dump_type

CONNECT_TIMEOUT_S = 10.0  # reaching the server and reading its catalog
SESSION_TIMEOUT_S = 60  # a server-side cap on any statement of our sessions, introspection included
TABLES_TTL_S = 30.0  # introspection is reused this long: the app asks for the tables on every request
POOL_SIZE, POOL_OVERFLOW = 2, 4  # connections kept open, and opened beyond them under load
READ_ONLY = "read-only: not run"
CURSOR = "starsql_run"  # the server-side cursor a PostgreSQL query is read through

# URL scheme -> (SQLAlchemy driver URL scheme, sqlglot dialect, pip package of the driver).
SCHEMES = {
    "postgresql": ("postgresql+psycopg", "postgres", "psycopg"),
    "postgres": ("postgresql+psycopg", "postgres", "psycopg"),
    "postgresql+psycopg": ("postgresql+psycopg", "postgres", "psycopg"),
    "mysql": ("mysql+pymysql", "mysql", "pymysql"),
    "mariadb": ("mysql+pymysql", "mysql", "pymysql"),
    "mysql+pymysql": ("mysql+pymysql", "mysql", "pymysql"),
    "mariadb+pymysql": ("mysql+pymysql", "mysql", "pymysql"),
    "sqlite": ("sqlite", "sqlite", None),
    "duckdb": ("duckdb", "duckdb", "duckdb"),
}


class LiveError(ValueError):
    """What went wrong with a live database, in words that say what to fix; never holds a password.
    `kind`: driver, url, unreachable, login, database, timeout, read_only or sql."""

    def __init__(self, message: str, kind: str = "sql"):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------------------------
# Passwords out of every text


_PASSWORD_PARAM = re.compile(r"(?i)([?&;\s](?:password|passwd|pwd)=)[^&;\s]*")


def _user_and_password(url: str) -> tuple[str, str, str, str | None]:
    """(scheme://, user, rest from the @ on, password or None). The last @ ends the user info: a
    password typed into a URL may hold @, / or ? unencoded (an @ later in the URL only hides more)."""
    scheme, sep, rest = url.partition("://")
    if not sep or rest.startswith("/") or "@" not in rest:  # file URLs (sqlite:///x.db) hold no password
        return url, "", "", None
    userinfo, after = rest[:rest.rindex("@")], rest[rest.rindex("@"):]
    user, colon, password = userinfo.partition(":")
    return scheme + "://", user, after, password if colon else None


def redact(url: str) -> str:
    """`url` with its password (in user:password@ and in ?password=) replaced by ***."""
    head, user, after, password = _user_and_password(str(url))
    url = head + user + (":***" if password is not None else "") + after if after else str(url)
    return _PASSWORD_PARAM.sub(r"\1***", url)


def _password(url: str) -> str | None:
    password = _user_and_password(url)[3]
    match = _PASSWORD_PARAM.search(url)
    return password if password is not None else (match.group(0).split("=", 1)[1] if match else None)


def _scrubber(url: str):
    """A function that removes `url`'s password, in every spelling, from a text (an error's)."""
    password = _password(url)
    spellings = {s for s in (password, password and unquote(password), password and quote(password, safe=""))
                 if s}

    def scrub(text: str) -> str:
        text = str(text).replace(url, redact(url))
        for spelling in sorted(spellings, key=len, reverse=True):
            text = text.replace(spelling, "***")
        return text
    return scrub


# ---------------------------------------------------------------------------------------------
# Types, as the prompt spells them


def sqlite_type(type_text: str, dialect: str) -> str:
    """A column type as `dialect` spells it (`character varying(20)`, `int unsigned`, `HUGEINT`) in the
    SQLite-style name a dump of the same column gets (dumps.sqlite_type), so a live database, a dump
    and a file of one schema give the model the same prompt."""
    try:
        kind = exp.DataType.build(type_text, dialect=dialect, udt=True)
    except (sqlglot.errors.SqlglotError, ValueError):
        kind = None  # TEXT
    return dump_type(kind, dialect)


# ---------------------------------------------------------------------------------------------
# What may run


def check_query(sql: str, dialect: str) -> None:
    """LiveError unless `sql` is one query that only reads. The read-only transaction is the guard;
    this keeps out what a transaction cannot stop: a second statement after a COMMIT, DDL that commits
    on its own (MySQL runs DROP TABLE even inside START TRANSACTION READ ONLY), SELECT ... INTO."""
    kind = statement_kind(sql, dialect)
    why = (f"it is not one statement that reads as {dialect}." if kind is None
           else f"it is a {kind} statement, not a query." if kind != "SELECT"
           else "SELECT ... INTO writes." if parse(sql, dialect).find(exp.Into) else None)
    if why:
        raise LiveError(f"{READ_ONLY}: {why} Only one SELECT (or WITH ... SELECT) query runs on a live "
                        "database.", "read_only")


# ---------------------------------------------------------------------------------------------
# Connecting


_OPEN: "OrderedDict[str, LiveDatabase]" = OrderedDict()  # url -> its database, pool and all, per process
_OPEN_LOCK = threading.Lock()
MAX_OPEN = 4  # distinct URLs kept open; the least recently used one is closed beyond that


def connect(url: str, seconds: float = CONNECT_TIMEOUT_S) -> "LiveDatabase":
    """The database at `url`, its server reached and the login accepted (else LiveError):
    postgresql://user:password@host:5432/db, mysql://..., sqlite:///path.db, duckdb:///path.duckdb.
    Every call with the same URL shares one connection pool and one introspection (for TABLES_TTL_S):
    the app connects on every request."""
    if not isinstance(url, str) or "://" not in url:
        raise LiveError("A database URL looks like postgresql://user:password@host:5432/dbname, "
                        "mysql://user:password@host:3306/dbname, sqlite:///path/to.db or duckdb:///path/to.duckdb.",
                        "url")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise LiveError(f"Unsupported database URL scheme {scheme!r}: use postgresql:// (psycopg), mysql:// "
                        "(pymysql), sqlite:/// or duckdb:///.", "url")
    with _OPEN_LOCK:
        database = _OPEN.get(url)
        if database is not None:
            _OPEN.move_to_end(url)
    if database is not None:
        database.ping()
        return database
    database = (DuckFile if scheme == "duckdb" else LiveDatabase)(url, seconds)
    with _OPEN_LOCK:
        opened, database = database, _OPEN.setdefault(url, database)  # another request may have opened it too
        evicted = [_OPEN.popitem(last=False)[1] for _ in range(len(_OPEN) - MAX_OPEN)]
    for unused in evicted + ([opened] if opened is not database else []):
        unused._dispose()
    return database


def close_all() -> None:
    """Close every pool connect() opened (at shutdown, and between tests)."""
    with _OPEN_LOCK:
        databases = list(_OPEN.values())
        _OPEN.clear()
    for database in databases:
        database._dispose()


class LiveDatabase:
    """A database reached through SQLAlchemy: one small connection pool, shared by every request."""

    def __init__(self, url: str, seconds: float = CONNECT_TIMEOUT_S):
        import sqlalchemy

        self._scrub, self._redacted = _scrubber(url), redact(url)
        self._tables, self._tables_at = None, 0.0
        scheme = url.split("://", 1)[0].lower()
        driver_scheme, self.dialect, package = SCHEMES[scheme]
        try:
            if self.dialect == "sqlite":
                self._engine = self._sqlite_engine(_file_path(url, "SQLite", ".db"))
            else:
                # The password goes in apart from the URL text: typed into a URL it may hold @ / ? unencoded.
                _, user, after, password = _user_and_password(url)
                rest = user + after if after else url.split("://", 1)[1]
                sa_url = sqlalchemy.engine.make_url(f"{driver_scheme}://{rest}")
                if password is not None:
                    sa_url = sa_url.set(password=unquote(password))
                self._engine = sqlalchemy.create_engine(
                    sa_url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, pool_pre_ping=True, pool_recycle=1800,
                    pool_timeout=seconds, connect_args=self._connect_args(seconds))
        except LiveError:
            raise
        except (ImportError, sqlalchemy.exc.NoSuchModuleError):
            raise LiveError(f"No driver for {scheme}:// databases: pip install {package}.", "driver") from None
        except (sqlalchemy.exc.ArgumentError, ValueError) as error:
            raise LiveError(f"The database URL cannot be read ({self._scrub(error)}): write it as "
                            f"{scheme}://user:password@host:port/dbname.", "url") from None
        self.ping()  # a wrong host, password or database name fails here, not at the first query

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._redacted})"

    def _connect_args(self, seconds: float) -> dict:
        wait = max(2, math.ceil(seconds))  # drivers take whole seconds
        if self.dialect == "postgres":
            # Every transaction of these sessions is read-only and every statement capped, introspection
            # included; run() narrows the cap per query.
            return {"connect_timeout": wait, "application_name": "starsql",
                    "options": f"-c default_transaction_read_only=on -c statement_timeout={SESSION_TIMEOUT_S * 1000}"}
        return {"connect_timeout": wait, "init_command": "SET SESSION TRANSACTION READ ONLY"}

    @staticmethod
    def _sqlite_engine(path: Path):
        import sqlalchemy

        # Read-only, not immutable (as an upload's copy is): others may be writing to a live database.
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"

        def open_read_only():
            return sqlite3.connect(uri, uri=True, check_same_thread=False)
        return sqlalchemy.create_engine("sqlite://", creator=open_read_only, poolclass=sqlalchemy.pool.QueuePool,
                                        pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, pool_pre_ping=True)

    # -- connections and errors

    def ping(self) -> None:
        """LiveError unless the server answers and accepts the login."""
        with self._connection() as raw:
            raw.rollback()

    def _connection(self):
        """A pooled DBAPI connection (a context manager that returns it to the pool), or LiveError."""
        try:
            return _Returning(self._engine.raw_connection())
        except Exception as error:
            raise self._error(error, connecting=True) from None

    def _error(self, error: Exception, seconds: float | None = None, connecting: bool = False) -> LiveError:
        """`error` (SQLAlchemy's, the driver's or the engine's) as a LiveError that says what to fix."""
        if isinstance(error, LiveError):
            return error
        cause = getattr(error, "orig", None) or error
        text = " ".join(self._scrub(str(cause)).replace(f'DECLARE "{CURSOR}" CURSOR FOR ', "").split())  # one line
        text = text or type(cause).__name__
        # PostgreSQL's SQLSTATE, MySQL's error number (pymysql's errors carry both)
        number = cause.args[0] if cause.args and isinstance(cause.args[0], int) else None
        codes = {getattr(cause, "sqlstate", None), number}
        lower, where = text.lower(), self._redacted
        # PostgreSQL reports login problems before a session exists, so without a SQLSTATE: its words tell.
        if codes & {"28P01", "28000", 1045} or "password authentication failed" in lower:
            return LiveError(f"The database at {where} refused the login: check the user name and password "
                             f"in the URL ({text}).", "login")
        if codes & {"3D000", 1049, 1044} or re.search(r'database "[^"]*" does not exist', text):
            return LiveError(f"The database named in {where} does not exist on that server, or this user may "
                             f"not use it: check the name after the last / ({text}).", "database")
        if codes & {"57014", 1969, 3024} or "interrupted" in lower or "statement timeout" in lower:
            return _timeout(seconds or 0)
        if codes & {"25006", 1792} or "read-only" in lower or "readonly" in lower or "not authorized" in lower:
            return LiveError(f"{READ_ONLY}: the database refused a write in a read-only transaction ({text}).",
                             "read_only")
        if codes & {2003, 2005, 2013} or any(words in lower for words in (
                "connection refused", "could not connect", "can't connect", "timeout expired", "timed out",
                "could not translate host", "name or service not known", "no route to host", "connection failed")):
            return LiveError(f"Cannot reach the database server at {where}: is it running, and are the host "
                             f"and port right? ({text})", "unreachable")
        if "file is not a database" in lower or "unable to open" in lower:
            return LiveError(f"{where} is not a database this app can open read-only ({text}).", "database")
        if connecting:
            return LiveError(f"Cannot connect with {where}: {text}. Check the URL.", "url")
        return LiveError(f"The database refused the query: {text}", "sql")

    # -- the schema

    def tables(self) -> list[Table]:
        """Tables and views of the default schema: columns, SQLite-style types, primary and foreign keys."""
        if self._tables is None or time.monotonic() - self._tables_at > TABLES_TTL_S:
            try:
                self._tables = self._introspect()
            except Exception as error:
                raise self._error(error) from None
            self._tables_at = time.monotonic()
        return self._tables

    def _introspect(self) -> list[Table]:
        import sqlalchemy

        if self.dialect == "sqlite":
            with self._connection() as raw:
                return sqlite_tables(raw.driver_connection)  # the declared types, as an uploaded file shows them
        inspector = sqlalchemy.inspect(self._engine)
        tables = []
        with warnings.catch_warnings():  # "Did not recognize type ...": such a column becomes TEXT
            warnings.simplefilter("ignore", sqlalchemy.exc.SAWarning)
            views = inspector.get_view_names()
            if self.dialect == "postgres":
                views += inspector.get_materialized_view_names()
            names = [(name, False) for name in inspector.get_table_names()] + [(name, True) for name in views]
            for name, view in names:
                columns = [Column(c["name"], self._type(c["type"])) for c in inspector.get_columns(name)]
                table = Table(name, columns, view=view)
                if not view:
                    table.primary_key = list(inspector.get_pk_constraint(name).get("constrained_columns") or [])
                    table.foreign_keys = [ForeignKey(list(key["constrained_columns"]), key["referred_table"],
                                                     list(key["referred_columns"]))
                                          for key in inspector.get_foreign_keys(name)]
                tables.append(table)
        return tables

    def _type(self, column_type) -> str:
        try:
            text = column_type.compile(dialect=self._engine.dialect)
        except Exception:  # a type SQLAlchemy reflects but cannot spell (NullType)
            return "TEXT"
        return sqlite_type(text, self.dialect)

    # -- queries

    def run(self, sql: str, seconds: float, max_rows: int) -> tuple[list[str], list[list], bool]:
        """Run one SELECT read-only: (column names, at most max_rows rows, whether there were more)."""
        check_query(sql, self.dialect)
        with self._connection() as raw:
            try:
                with self._read_only(raw, seconds, max_rows) as cursor:
                    cursor.execute(sql)
                    return fetch_capped(cursor, max_rows)
            except Exception as error:
                raise self._error(error, seconds) from None

    @contextlib.contextmanager
    def _read_only(self, raw, seconds: float, max_rows: int):
        """A cursor in a fresh read-only transaction whose statements stop after `seconds`; rolled back,
        and the session's settings undone, whatever happens."""
        undo = contextlib.ExitStack()
        if self.dialect == "postgres":
            setup = raw.cursor()
            setup.execute("SET TRANSACTION READ ONLY")
            setup.execute(f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}")  # ends with the transaction
            cursor = raw.driver_connection.cursor(name=CURSOR)  # server-side: rows arrive as fetched
        elif self.dialect == "mysql":
            import pymysql.cursors

            mariadb = self._engine.dialect.is_mariadb
            variable = "max_statement_time" if mariadb else "max_execution_time"  # seconds / milliseconds
            setup = raw.cursor()
            setup.execute(f"SET SESSION {variable} = {seconds:.3f}" if mariadb
                          else f"SET SESSION {variable} = {max(1, round(seconds * 1000))}")
            # The server sends at most max_rows + 1 rows (a LIMIT in the query wins): closing an unbuffered
            # cursor reads whatever rows are left.
            setup.execute(f"SET SESSION sql_select_limit = {max_rows + 1}")
            undo.callback(lambda: raw.cursor().execute(f"SET SESSION {variable} = DEFAULT, sql_select_limit = DEFAULT"))
            setup.execute("START TRANSACTION READ ONLY")
            cursor = raw.cursor(pymysql.cursors.SSCursor)  # unbuffered: rows arrive as fetched
        else:  # SQLite: the file is open read-only; the authorizer refuses writes, the progress handler stops it
            undo.enter_context(authorizer(raw.driver_connection, read_only_authorizer))
            undo.enter_context(time_limit(raw.driver_connection, seconds))
            cursor = raw.cursor()
        try:
            yield cursor
        finally:
            try:
                cursor.close()
                raw.rollback()
                undo.close()
            except Exception:
                raw.invalidate()  # a connection in an unknown state leaves the pool

    def close(self) -> None:
        """This request is done with the database; its pool stays open for the next (close_all() closes it)."""

    def _dispose(self) -> None:
        self._engine.dispose()


def _timeout(seconds: float) -> LiveError:
    return LiveError(f"The query was stopped after {seconds:.3g} s (the time limit): make it simpler or more "
                     "selective.", "timeout")


class _Returning:
    """A pooled connection as a context manager: back to the pool (rolled back) at the block's end."""

    def __init__(self, raw):
        self.raw = raw

    def __enter__(self):
        return self.raw

    def __exit__(self, *exc):
        self.raw.close()


def _file_path(url: str, engine: str, suffix: str) -> Path:
    """The file of a sqlite:/// or duckdb:/// URL (three slashes and a relative path, four and an absolute one)."""
    path = Path(unquote(url.split("://", 1)[1].split("?", 1)[0]).removeprefix("/"))
    if not path.is_file():
        scheme = url.split("://", 1)[0]
        raise LiveError(f"No {engine} database at {path}: use {scheme}:///relative/path{suffix} or "
                        f"{scheme}:////absolute/path{suffix}.", "database")
    return path


class DuckFile(LiveDatabase):
    """A DuckDB file in the DuckDB sandbox (starsql/db/duck.py), attached read-only (its memory limit,
    no other files or settings). Queries run in the sandbox's worker processes, a fresh DuckDB
    instance each, side by side: what DuckDB does not bound in-process (one call building gigabytes,
    deaf to interrupt) is bounded there. Opening and introspecting the file run only our own SQL, here."""

    def __init__(self, url: str, seconds: float = CONNECT_TIMEOUT_S):
        self._scrub, self._redacted, self.dialect = _scrubber(url), redact(url), "duckdb"
        self._tables, self._tables_at = None, 0.0
        self._path = _file_path(url, "DuckDB", ".duckdb")
        with self._sandbox():  # a file that is not a DuckDB database fails here
            pass

    @contextlib.contextmanager
    def _sandbox(self):
        import duckdb

        from . import duck

        try:
            conn = duck.open_duck(self._path)
            duck.lock(conn)
        except duckdb.Error as error:
            raise LiveError(f"Cannot open {self._path} read-only with DuckDB ({self._scrub(error)}).",
                            "database") from None
        try:
            yield conn
        finally:
            conn.close()

    def ping(self) -> None:
        """LiveError if the file is gone."""
        _file_path(f"duckdb:///{self._path}", "DuckDB", ".duckdb")

    def _introspect(self) -> list[Table]:
        from . import duck

        with self._sandbox() as conn:
            return duck.duck_tables(conn)

    def run(self, sql: str, seconds: float, max_rows: int) -> tuple[list[str], list[list], bool]:
        from ..serve.check import SchemaError
        from . import duck

        check_query(sql, self.dialect)
        budget = Budget(seconds)  # the worker's start is not in it (a spare is ready); attaching the file is
        try:
            database = duck.open_isolated([], budget, path=self._path)
        except SchemaError as error:
            if budget.left <= 0:
                raise _timeout(seconds) from None
            raise LiveError(f"Cannot open {self._path} read-only with DuckDB ({self._scrub(error.error)}).",
                            "database") from None
        try:
            return database.run(sql, max_rows)
        except duck.WorkerStopped as stopped:
            if stopped.why == "died":
                raise LiveError(f"The database refused the query: it {stopped}.", "sql") from None
            raise _timeout(seconds) from None
        except duck.QueryError as error:
            raise LiveError(f"The database refused the query: {self._scrub(error)}", "sql") from None
        finally:
            database.close()

    def _dispose(self) -> None:
        """Nothing stays open between queries."""
