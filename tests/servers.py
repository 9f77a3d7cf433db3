"""Real PostgreSQL and MariaDB servers for tests and benchmarks, started from the Debian packages.

    with postgres_server() as url:      # "postgresql://starsql:PASSWORD@127.0.0.1:PORT/starsql"
        ...
    with mariadb_server() as url:       # "mysql://starsql:PASSWORD@127.0.0.1:PORT/starsql"
        ...

Each server lives in its own temporary directory, listens on 127.0.0.1 on a free port (no other
network), runs with durability off and small buffers (fast to start; the data is thrown away), and
is killed with its whole process group, and its directory removed, when the block exits, however
it exits. `postgres_available()` / `mariadb_available()` return None, or why the server cannot be
started here (for a pytest skip). `dump_postgres` / `dump_mariadb` run the real pg_dump / mysqldump.
"""

import contextlib
import ctypes
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

USER = "starsql"
DATABASE = "starsql"
START_TIMEOUT_S = 60


class ServerError(RuntimeError):
    pass


def _postgres_bin() -> Path | None:
    """The directory holding initdb/postgres/pg_dump: $STARSQL_PG_BIN, else the newest Debian one."""
    candidates = [os.environ.get("STARSQL_PG_BIN", "")] + sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(n) for n in re.findall(r"\d+", p)], reverse=True)
    for directory in candidates:
        if directory and all((Path(directory) / name).is_file() for name in ("initdb", "postgres", "pg_dump")):
            return Path(directory)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("postgres") else None


def _unprivileged_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` (or `nobody`) account."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerError("running as root and there is no `postgres` or `nobody` account to run PostgreSQL as")


def postgres_available() -> str | None:
    """None if a PostgreSQL server can be started here, else why not."""
    if _postgres_bin() is None:
        return "PostgreSQL binaries (initdb, postgres, pg_dump) not found: apt-get install postgresql"
    try:
        _unprivileged_user()
    except ServerError as error:
        return str(error)
    return None


def mariadb_available() -> str | None:
    """None if a MariaDB server can be started here, else why not."""
    missing = [name for name in ("mariadbd", "mariadb-install-db", "mariadb", "mysqldump")
               if not shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin")]
    if missing:
        return f"MariaDB binaries not found ({', '.join(missing)}): apt-get install mariadb-server mariadb-client"
    return None


_prctl = getattr(ctypes.CDLL(None), "prctl", None)  # Linux only
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the server's process (preexec_fn): SIGTERM it when the test process dies, even by SIGKILL,
    which skips every `finally`."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(command: list, **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S, **kwargs)
    if done.returncode != 0:
        raise ServerError(f"{Path(command[0]).name} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    return done.stdout


def _kill_group(process: subprocess.Popen) -> None:
    """Stop the server and anything it started: SIGTERM to its process group, SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_until_ready(process: subprocess.Popen, ready, log: Path, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"{name} exited ({process.returncode}) while starting: {_tail(log)}")
        if ready():
            return
        time.sleep(0.1)
    raise ServerError(f"{name} did not accept connections within {START_TIMEOUT_S} s: {_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.is_file() else "(no log)"


@contextlib.contextmanager
def _server_dir(prefix: str, owner: pwd.struct_passwd | None = None):
    """A temporary directory (owned by `owner`, so an unprivileged server can write it), always removed."""
    base = tempfile.gettempdir()
    if owner is not None and not os.stat(base).st_mode & 0o001:  # `owner` could not even reach its directory
        base = "/tmp"
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        if owner is not None:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def postgres_server():
    """A fresh PostgreSQL server; yields its URL (a superuser with a password, and its own database)."""
    reason = postgres_available()
    if reason:
        raise ServerError(reason)
    bin_dir, owner = _postgres_bin(), _unprivileged_user()
    as_owner = dict(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[]) if owner else {}
    password, port = secrets.token_urlsafe(12), free_port()
    with _server_dir("starsql-pg-", owner) as root:
        data, log, password_file = root / "data", root / "server.log", root / "password"
        password_file.write_text(password + "\n")
        if owner:
            os.chown(password_file, owner.pw_uid, owner.pw_gid)
        # -N: no fsync of the new cluster; trust only on the private socket, a password over TCP.
        _run([bin_dir / "initdb", "-D", data, "-U", USER, f"--pwfile={password_file}", "-N", "-E", "UTF8",
              "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256"], cwd=root, **as_owner)
        with open(log, "w") as log_file:
            if owner:
                os.chown(log, owner.pw_uid, owner.pw_gid)
            process = subprocess.Popen(
                [bin_dir / "postgres", "-D", data, "-p", str(port), "-h", "127.0.0.1", "-k", root,
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "shared_buffers=16MB", "-c", "max_connections=40", "-c", "logging_collector=off"],
                cwd=root, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent, **as_owner)
        try:
            def ready() -> bool:
                return subprocess.run([bin_dir / "pg_isready", "-q", "-h", root, "-p", str(port)],
                                      capture_output=True).returncode == 0
            _wait_until_ready(process, ready, log, "postgres")
            _run([bin_dir / "psql", "-h", root, "-p", str(port), "-U", USER, "-d", "postgres", "-X", "-q",
                  "-v", "ON_ERROR_STOP=1", "-c", f"CREATE DATABASE {DATABASE}"], cwd=root, **as_owner)
            yield f"postgresql://{USER}:{password}@127.0.0.1:{port}/{DATABASE}"
        finally:
            _kill_group(process)


def _mariadb_user_args() -> list[str]:
    return ["--user=root"] if os.geteuid() == 0 else []  # mariadbd as root needs to be told so


@contextlib.contextmanager
def mariadb_server():
    """A fresh MariaDB server; yields its URL (a user with a password and all rights on its database)."""
    reason = mariadb_available()
    if reason:
        raise ServerError(reason)
    mariadbd = shutil.which("mariadbd", path=os.environ.get("PATH", "") + ":/usr/sbin")
    password, port = secrets.token_urlsafe(12), free_port()
    with _server_dir("starsql-mariadb-") as root:
        data, log, sock = root / "data", root / "server.log", root / "mysqld.sock"
        _run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", *_mariadb_user_args(),
              "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve",
              f"--log-error={log}"], cwd=root)
        process = subprocess.Popen(
            [mariadbd, "--no-defaults", f"--datadir={data}", *_mariadb_user_args(), f"--socket={sock}",
             f"--port={port}", "--bind-address=127.0.0.1", "--skip-networking=0", "--skip-name-resolve",
             f"--pid-file={root / 'mysqld.pid'}", f"--log-error={log}", "--skip-log-bin",
             "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M",
             "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0", "--innodb-flush-method=nosync",
             "--performance-schema=0", "--max-connections=40"],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent)
        try:
            root_client = ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "--batch"]

            def ready() -> bool:
                return sock.exists() and subprocess.run([*root_client, "-e", "SELECT 1"],
                                                        capture_output=True).returncode == 0
            _wait_until_ready(process, ready, log, "mariadbd")
            _run([*root_client, "-e", f"CREATE DATABASE {DATABASE}; "
                  f"CREATE USER '{USER}'@'%' IDENTIFIED BY '{password}'; "
                  f"GRANT ALL ON {DATABASE}.* TO '{USER}'@'%';"], cwd=root)
            yield f"mysql://{USER}:{password}@127.0.0.1:{port}/{DATABASE}"
        finally:
            _kill_group(process)


def _parts(url: str):
    parts = urlsplit(url)
    return parts.hostname, str(parts.port), parts.username, parts.password or "", parts.path.lstrip("/")


def dump_postgres(url: str, schema_only: bool = False, extra_args: tuple[str, ...] = ()) -> str:
    """pg_dump's output (plain SQL, COPY blocks for data) for the database at `url`; `extra_args`
    are more pg_dump options (`--column-inserts`, ...)."""
    host, port, user, password, database = _parts(url)
    command = [_postgres_bin() / "pg_dump", "-h", host, "-p", port, "-U", user, *extra_args,
               *(["--schema-only"] if schema_only else []), "-d", database]
    # The password goes through the environment, not the command line other processes can read.
    return _run(command, env={**os.environ, "PGPASSWORD": password})


def dump_mariadb(url: str, no_data: bool = False, extra_args: tuple[str, ...] = ()) -> str:
    """mysqldump's output (multi-row INSERTs for data) for the database at `url`; `extra_args` are
    more mysqldump options (`--compact`, ...)."""
    host, port, user, password, database = _parts(url)
    command = ["mysqldump", "--no-defaults", "-h", host, "-P", port, "-u", user, *extra_args,
               *(["--no-data"] if no_data else []), database]
    return _run(command, env={**os.environ, "MYSQL_PWD": password})
