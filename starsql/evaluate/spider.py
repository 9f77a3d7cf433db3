"""Spider's inputs and databases: loading questions and predictions, running SQL read-only with limits.

Bad input (a missing file, a wrong line count, an absent or unreadable database) raises an
InputError with a message the command line prints as is, without a traceback.

Every query runs on a read-only connection whose progress handler really interrupts SQLite at
the time limit, with a cap on rows and on the size of any value a query may build. Spider's
shared dev copy lacks the `wta_1` database: its questions are skipped, not an error.
"""

import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .hardness import hardness
from ..sandbox import read_only_authorizer, time_limit
from ..schema import load_spider_schemas, split_statements

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ROWS = 100_000
PROGRESS_STEPS = 1_000  # SQLite VM instructions between deadline checks
FLOAT_DIGITS = 10  # significant digits: AVG vs SUM/COUNT differ in the last bits
MAX_VALUE_BYTES = 10_000_000  # longest string or blob a query may build
KNOWN_MISSING_DBS = frozenset({"wta_1"})  # absent from the shared Spider dev copy: skipped, not an error


class InputError(Exception):
    """Marks errors caused by the user's input, as opposed to bugs."""


class PredictionCountError(InputError, ValueError):
    pass


class MissingDatabaseError(InputError, FileNotFoundError):
    pass


class CorruptDatabaseError(InputError, ValueError):
    pass


class MissingInputError(InputError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class Example:
    """A Spider dev question (with a database) or a schema-only row (CREATE TABLE text only)."""

    index: int
    question: str
    gold: str
    schema: str  # CREATE TABLE text, as the prompt shows it
    db_id: str | None = None  # Spider only
    hardness: str | None = None  # Spider only


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path}.")
    return path


def _lines(text: str) -> list[str]:
    """Lines of a file; a final newline ends the last line rather than starting an empty one."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def load_spider(spider_dir: str | Path, limit: int | None = None) -> list[Example]:
    """The first `limit` (default: all) questions of Spider's dev.json, with gold SQL and hardness."""
    spider_dir = Path(spider_dir)
    dev_file = _require_file(spider_dir / "dev.json", "Spider dev.json (is --spider the spider_dev folder?)")
    dev = json.loads(dev_file.read_text())
    schemas = load_spider_schemas(_require_file(spider_dir / "tables.json", "Spider tables.json"))
    gold_file = spider_dir / "dev_gold.sql"
    if gold_file.is_file():  # the official gold file; same SQL as dev.json's `query`
        gold = [line.rsplit("\t", 1)[0] for line in _lines(gold_file.read_text())]
        if len(gold) != len(dev):
            raise InputError(f"{gold_file} has {len(gold)} lines but dev.json has {len(dev)} questions.")
    else:
        gold = [entry["query"] for entry in dev]
    examples = []
    for index, (entry, sql) in enumerate(zip(dev, gold)):
        if entry["db_id"] not in schemas:
            raise InputError(f"dev.json question {index} uses db_id {entry['db_id']!r}, which tables.json lacks.")
        examples.append(
            Example(index, entry["question"], sql, schemas[entry["db_id"]], entry["db_id"], hardness(entry["sql"]))
        )
    return examples[:limit] if limit is not None else examples


def load_schema_only(path: str | Path, limit: int | None = None) -> list[Example]:
    """sql-create-context style rows {question, context, answer} from a .jsonl or .json file."""
    path = _require_file(Path(path), "Schema-only evaluation file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON/JSON Lines: {error}.") from None
    examples = []
    for index, row in enumerate(rows[:limit] if limit is not None else rows):
        missing = {"question", "context", "answer"} - set(row)
        if missing:
            raise InputError(f"{path} row {index} lacks {sorted(missing)}; rows need question, context and answer.")
        examples.append(Example(index, row["question"], row["answer"], row["context"]))
    return examples


def read_predictions(path: str | Path, examples: list[Example]) -> list[str]:
    """One SQL per line, in dev order. Lines of a gold-style file (`SQL<TAB>db_id`) are accepted too."""
    path = _require_file(Path(path), "Predictions file")
    lines = _lines(path.read_text())
    if len(lines) != len(examples):
        raise PredictionCountError(
            f"{path} has {len(lines)} lines, expected {len(examples)} (one SQL per line, in dev.json order"
            f"{'; --limit takes the first N questions' if len(examples) < len(lines) else ''}). "
            "Empty lines count as (wrong) predictions: check for dropped or split lines."
        )
    predictions = []
    for line, example in zip(lines, examples):
        sql, _, suffix = line.rpartition("\t")
        predictions.append(sql if sql and example.db_id and suffix.strip() == example.db_id else line)
    return predictions


def database_path(spider_dir: str | Path, db_id: str) -> Path:
    return Path(spider_dir) / "database" / db_id / f"{db_id}.sqlite"


@dataclass
class Outcome:
    """A query's rows (values normalised), or the error that stopped it."""

    rows: list[tuple] | None = None
    error: str | None = None


class Database:
    """One SQLite connection with a per-query deadline that interrupts the VM, not just the caller."""

    def __init__(self, connection: sqlite3.Connection, name: str):
        self.name = name
        self.connection = connection
        # Some Spider databases hold bytes that are not UTF-8; the test-suite evaluator decodes leniently too.
        connection.text_factory = lambda data: data.decode(errors="replace")
        connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)  # no randomblob(1e9) memory blowups

    @classmethod
    def open_read_only(cls, path: str | Path) -> "Database":
        path = Path(path).resolve()
        try:
            connection = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, check_same_thread=False)
            tables = connection.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        except sqlite3.Error as error:
            raise CorruptDatabaseError(
                f"Cannot read SQLite database {path}: {error}. Replace the file with a good copy."
            ) from None
        if tables == 0:
            raise CorruptDatabaseError(
                f"SQLite database {path} has no tables (empty or truncated file). Replace it with a good copy."
            )
        database = cls(connection, str(path))
        connection.set_authorizer(read_only_authorizer)
        return database

    @classmethod
    def from_schema(cls, schema: str) -> "Database":
        """An empty in-memory database with the given CREATE TABLE statements (schema-only sets)."""
        connection = sqlite3.connect(":memory:", check_same_thread=False)
        for statement in split_statements(schema):
            connection.execute(statement)  # sqlite3.Error propagates: the caller counts the row as skipped
        database = cls(connection, ":memory:")
        connection.set_authorizer(read_only_authorizer)
        return database

    def columns(self) -> set[str]:
        """Lower-cased column names of every table (tells `"text"` literals from quoted columns)."""
        self.connection.set_authorizer(None)
        try:
            names = set()
            for (table,) in self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
                quoted = '"' + table.replace('"', '""') + '"'
                names.update(row[1].lower() for row in self.connection.execute(f"PRAGMA table_info({quoted})"))
            return names
        finally:
            self.connection.set_authorizer(read_only_authorizer)

    def compiles(self, sql: str) -> str | None:
        """None when SQLite can compile `sql` (EXPLAIN succeeds), else the error message."""
        if not sql.strip():
            return "empty prediction"
        return self.run("EXPLAIN " + sql, timeout=DEFAULT_TIMEOUT_S, max_rows=math.inf).error

    def run(self, sql: str, timeout: float = DEFAULT_TIMEOUT_S, max_rows: float = DEFAULT_MAX_ROWS) -> Outcome:
        # test-suite's asyncio timeout never fires while SQLite runs; time_limit's progress handler does.
        started = time.monotonic()
        try:
            with time_limit(self.connection, timeout, PROGRESS_STEPS):
                cursor = self.connection.execute(sql)
                rows = cursor.fetchall() if max_rows == math.inf else cursor.fetchmany(int(max_rows) + 1)
                cursor.close()
        except sqlite3.OperationalError as error:
            timed_out = str(error) == "interrupted" and time.monotonic() - started >= timeout
            return Outcome(error=f"timed out after {timeout:g} s" if timed_out else f"OperationalError: {error}")
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as error:
            return Outcome(error=f"{type(error).__name__}: {error}")
        if len(rows) > max_rows:
            return Outcome(error=f"more than {max_rows:,} rows")
        return Outcome(rows=[tuple(_normal_value(value) for value in row) for row in rows])

    def close(self) -> None:
        self.connection.close()


def _normal_value(value):
    # Floats equal up to FLOAT_DIGITS significant digits hash alike, so bags of rows compare exactly.
    return float(f"{value:.{FLOAT_DIGITS}g}") if isinstance(value, float) else value
