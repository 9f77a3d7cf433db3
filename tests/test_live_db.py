"""Live databases: real PostgreSQL and MariaDB servers (tests/servers.py), started once per module."""

import glob
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from servers import (dump_mariadb, dump_postgres, mariadb_available, mariadb_server, postgres_available,
                           postgres_server)


@pytest.fixture(scope="module")
def postgres_url():
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def mariadb_url():
    reason = mariadb_available()
    if reason:
        pytest.skip(reason)
    with mariadb_server() as url:
        yield url


def _port_open(url: str) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", urlsplit(url).port)) == 0


def test_servers_answer_and_dump(postgres_url, mariadb_url):
    """Both servers answer SELECT 1 with the URL's password, and pg_dump / mysqldump dump their tables."""
    import psycopg
    import pymysql

    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE smoke (id integer PRIMARY KEY)")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    maria = urlsplit(mariadb_url)
    conn = pymysql.connect(host=maria.hostname, port=maria.port, user=maria.username, password=maria.password,
                           database=maria.path.lstrip("/"))
    with conn.cursor() as cursor:
        cursor.execute("CREATE TABLE smoke (id integer PRIMARY KEY)")
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    conn.close()
    assert "CREATE TABLE public.smoke" in dump_postgres(postgres_url, schema_only=True)
    assert "CREATE TABLE `smoke`" in dump_mariadb(mariadb_url, no_data=True)


def test_server_is_torn_down_when_the_block_fails():
    """A failing test still stops its server (port closed) and removes its directory."""
    if postgres_available():
        pytest.skip(postgres_available())
    with pytest.raises(RuntimeError, match="test failed"):
        with postgres_server() as url:
            [socket_file] = glob.glob(f"{tempfile.gettempdir()}/starsql-pg-*/.s.PGSQL.{urlsplit(url).port}")
            raise RuntimeError("test failed")
    assert not _port_open(url) and not Path(socket_file).parent.exists()
