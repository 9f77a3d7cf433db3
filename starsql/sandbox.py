"""The read-only SQLite sandbox that generated SQL runs in: the app's schema check and the
evaluation harness share one definition of "only reads" and one time limit."""

import sqlite3
import time
from contextlib import contextmanager

READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def is_read(action: int, arg1) -> bool:
    # Table-valued functions (json_each, pragma_table_info) register themselves with an internal
    # UPDATE of sqlite_master when first used; user SQL cannot write sqlite_master.
    return action in READ_ACTIONS or (action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master")


def read_only_authorizer(action, arg1, arg2, db_name, trigger) -> int:
    """For `Connection.set_authorizer`: reads pass, everything else (writes, PRAGMA, ATTACH) is refused."""
    return sqlite3.SQLITE_OK if is_read(action, arg1) else sqlite3.SQLITE_DENY


@contextmanager
def authorizer(conn: sqlite3.Connection, callback):
    conn.set_authorizer(callback)
    try:
        yield
    finally:
        conn.set_authorizer(None)


@contextmanager
def time_limit(conn: sqlite3.Connection, seconds: float, steps: int = 1000):
    """Abort whatever `conn` runs once `seconds` have passed: SQLite raises 'interrupted'.
    A progress handler really stops the VM, unlike a timer around the Python call."""
    deadline = time.monotonic() + seconds
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), steps)
    try:
        yield
    finally:
        conn.set_progress_handler(None, 0)
