"""Evaluation harness: execution accuracy, exact match and valid-SQL rate on Spider dev, by hardness.

    python -m starsql.evaluate --predictions preds.sql --spider ../shared/spider_dev --out runs/eval
    python -m starsql.evaluate --model bigcode/starcoder2-3b --adapter runs/sql --compare \\
        --spider ../shared/spider_dev --limit 200 --out runs/eval
    python -m starsql.evaluate --schema_only heldout.jsonl --model tiny-starcoder2 --adapter runs/tiny

Predictions are Spider's official format: one SQL per line, in dev.json order; an empty line is a
(wrong) prediction. Execution match follows the test-suite evaluator (taoyds/test-suite-sql-eval):
result rows compared as multisets, row order only when the gold query ends in ORDER BY, columns
may come in any order. Every prediction runs on a read-only connection whose progress handler
really interrupts SQLite at the time limit.

Spider's shared dev copy lacks the `wta_1` database, so its 62 questions are skipped and the
report says so: "EX on 972/1,034 (no wta_1)".

Outputs in --out: report.json, report.md, accuracy_by_hardness.png, per_example.jsonl and, in
model mode, preds.sql. With --compare each model's report.json / per_example.jsonl / preds.sql
go to out/base/ and out/adapter/, and out/report.json maps "base" and "adapter" to their reports.
"""

import argparse
import functools
import json
import math
import re
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .hardness import LEVELS, hardness
from .prompt import build_prompt
from .sandbox import read_only_authorizer, time_limit
from .schema import load_spider_schemas, split_statements

DEFAULT_TIMEOUT_S = 10.0
GOLD_TIMEOUT_S = 60.0  # gold queries are trusted; a slow machine must not fail them
DEFAULT_MAX_ROWS = 100_000
MAX_COLUMN_PERMUTATIONS = 1_000
PROGRESS_STEPS = 1_000  # SQLite VM instructions between deadline checks
FLOAT_DIGITS = 10  # significant digits: AVG vs SUM/COUNT differ in the last bits
MAX_VALUE_BYTES = 10_000_000  # longest string or blob a query may build
KNOWN_MISSING_DBS = {"wta_1"}  # absent from the shared Spider dev copy: skipped, not an error


# ---------------------------------------------------------------------------------------------
# Bad input: clear messages, printed by the CLI without a traceback (exit code 2).


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


# ---------------------------------------------------------------------------------------------
# Examples: Spider dev questions (with a database) or schema-only rows (CREATE TABLE text only).


@dataclass(frozen=True)
class Example:
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


def _lines(text: str) -> list[str]:
    """Lines of a file; a final newline ends the last line rather than starting an empty one."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


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


# ---------------------------------------------------------------------------------------------
# Running SQL: read-only, interruptible, bounded.


@dataclass
class Outcome:
    rows: list[tuple] | None = None
    error: str | None = None


class Database:
    """One SQLite connection with a per-query deadline that interrupts the VM, not just the caller."""

    def __init__(self, connection: sqlite3.Connection, name: str):
        self.name = name
        self.connection = connection
        self.file_key: tuple | None = None
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
        database.file_key = _file_key(path)  # gold results are cached per file version
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


def _normal_value(value):
    # Floats equal up to FLOAT_DIGITS significant digits hash alike, so bags of rows compare exactly.
    return float(f"{value:.{FLOAT_DIGITS}g}") if isinstance(value, float) else value


# ---------------------------------------------------------------------------------------------
# Comparing results the test-suite way: bags of rows, ordered when gold sorts, columns permuted.


def _column_matchings(candidates: list[list[int]], limit: int) -> Iterator[tuple[int, ...]]:
    """Permutations p with p[i] in candidates[i], identity first when allowed, at most `limit`."""
    chosen: list[int] = []
    used: set[int] = set()
    count = 0

    def extend(i: int) -> Iterator[tuple[int, ...]]:
        nonlocal count
        if i == len(candidates):
            count += 1
            yield tuple(chosen)
            return
        for j in candidates[i]:
            if j not in used and count < limit:
                chosen.append(j)
                used.add(j)
                yield from extend(i + 1)
                chosen.pop()
                used.discard(j)

    yield from extend(0)


def results_match(gold: list[tuple], predicted: list[tuple], order_matters: bool) -> bool:
    """True when some column order of `predicted` gives the same rows as `gold` (as a bag, or a list)."""
    if not gold and not predicted:
        return True
    if len(gold) != len(predicted) or len(gold[0]) != len(predicted[0]):
        return False
    width = len(gold[0])
    # A predicted column can only stand for a gold column holding the same bag of values.
    gold_columns = [Counter(row[i] for row in gold) for i in range(width)]
    predicted_columns = [Counter(row[j] for row in predicted) for j in range(width)]
    candidates = [[j for j in range(width) if predicted_columns[j] == gold_columns[i]] for i in range(width)]
    if not all(candidates):
        return False
    gold_bag = None if order_matters else Counter(gold)
    for permutation in _column_matchings(candidates, MAX_COLUMN_PERMUTATIONS):
        permuted = [tuple(row[j] for j in permutation) for row in predicted]
        if permuted == gold if order_matters else Counter(permuted) == gold_bag:
            return True
    return False


def execution_match(database: Database, gold_sql: str, predicted_sql: str, timeout: float = DEFAULT_TIMEOUT_S,
                    max_rows: int = DEFAULT_MAX_ROWS) -> tuple[bool, str | None]:
    """(match, error) for one prediction: its result against the gold query's, test-suite rules."""
    gold = database.run(gold_sql, timeout=max(timeout, GOLD_TIMEOUT_S), max_rows=max_rows)
    if gold.error is not None:
        return False, f"gold query failed: {gold.error}"
    return _compare(database, gold, gold_sql, predicted_sql, timeout, max_rows)


def _compare(database: Database, gold: Outcome, gold_sql: str, predicted_sql: str, timeout: float,
             max_rows: float) -> tuple[bool, str | None]:
    if not predicted_sql.strip():
        return False, "empty prediction"
    predicted = database.run(predicted_sql, timeout=timeout, max_rows=max_rows)
    if predicted.error is not None:
        return False, predicted.error
    return results_match(gold.rows, predicted.rows, order_matters(gold_sql)), None


def _parse(sql: str):
    """The one statement in `sql` as a sqlglot tree, or None when sqlglot cannot parse it."""
    import sqlglot

    try:
        statements = [s for s in sqlglot.parse(sql, read="sqlite") if s is not None]
    except Exception:  # sqlglot raises ParseError, TokenError and, on odd input, others
        return None
    return statements[0] if len(statements) == 1 else None


@functools.lru_cache(maxsize=4096)
def order_matters(gold_sql: str) -> bool:
    """Row order counts only when the gold query sorts its result (ORDER BY at the top level)."""
    tree = _parse(gold_sql)
    if tree is None:
        return "order by" in " ".join(gold_sql.lower().split())
    return tree.args.get("order") is not None


# ---------------------------------------------------------------------------------------------
# Exact match: both queries normalised by sqlglot, then compared as text.


_SIMPLE_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def _unalias_tables(tree) -> None:
    """Rename table aliases to the table's own name (`name_2` for a second copy); drop them."""
    from sqlglot import exp
    from sqlglot.optimizer.scope import traverse_scope

    for scope in traverse_scope(tree):
        tables = [source for source in scope.sources.values() if isinstance(source, exp.Table)]
        seen: Counter = Counter()
        renames = {}
        for table in tables:
            seen[table.name] += 1
            renames[table.alias_or_name] = table.name if seen[table.name] == 1 else f"{table.name}_{seen[table.name]}"
        single = len(scope.sources) == 1
        for column in scope.columns:
            if column.table in renames:
                # In a one-table scope `singer.name` and `name` mean the same column.
                column.set("table", None if single else exp.to_identifier(renames[column.table]))
        for table in tables:
            new = renames[table.alias_or_name]
            table.set("alias", None if new == table.name else exp.TableAlias(this=exp.to_identifier(new)))


def normalize_sql(sql: str, columns: set[str] | None = None) -> str:
    """Canonical text of a query: sqlglot's SQLite rendering with identifiers lower-cased, table
    aliases resolved, `"value"` literals as 'value' (when `columns` tells them from quoted
    columns), INNER JOIN as JOIN, default ASC dropped. Unparseable SQL: lower-cased, spaces squeezed."""
    from sqlglot import exp
    from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

    tree = _parse(sql)
    if tree is None:
        return " ".join(sql.lower().split()).rstrip(";").strip()
    try:
        if columns is not None:
            for column in list(tree.find_all(exp.Column)):
                # SQLite reads "France" as a string when no column has that name; Spider gold relies on it.
                if column.this.quoted and not column.table and column.name.lower() not in columns:
                    column.replace(exp.Literal.string(column.name))
        tree = normalize_identifiers(tree, dialect="sqlite")
        _unalias_tables(tree)
        for join in tree.find_all(exp.Join):
            if join.args.get("kind") == "INNER":
                join.set("kind", None)
        for ordered in tree.find_all(exp.Ordered):
            if not ordered.args.get("desc"):
                ordered.set("desc", None)
        for identifier in tree.find_all(exp.Identifier):
            if _SIMPLE_NAME.match(identifier.name):  # "singer" and singer name the same table
                identifier.set("quoted", False)
        return tree.sql(dialect="sqlite")
    except Exception:  # a tree sqlglot parsed but cannot rewrite: compare the plain rendering
        return " ".join(sql.lower().split()).rstrip(";").strip()


# ---------------------------------------------------------------------------------------------
# Scoring


_DATABASES: dict[tuple, Database] = {}
_GOLD_RESULTS: dict[tuple, Outcome] = {}  # (database file, gold SQL) -> result, across calls (--compare)
_NORMALIZED_GOLD: dict[tuple, str] = {}


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _spider_database(path: Path) -> Database:
    key = _file_key(path)
    if key not in _DATABASES:
        _DATABASES[key] = Database.open_read_only(path)
    return _DATABASES[key]


def check_databases(
    spider_dir: str | Path, examples: list[Example], skip_missing: bool = False
) -> dict[str, Database | None]:
    """db_id -> open Database (None: skipped). Fails before any scoring when a database is absent or unreadable."""
    databases: dict[str, Database | None] = {}
    for db_id in dict.fromkeys(example.db_id for example in examples):
        path = database_path(spider_dir, db_id)
        if path.is_file():
            databases[db_id] = _spider_database(path)
        elif db_id in KNOWN_MISSING_DBS or skip_missing:
            databases[db_id] = None
        else:
            raise MissingDatabaseError(
                f"Database for db_id {db_id!r} not found: {path}. Point --spider at a Spider folder with "
                f"database/<db_id>/<db_id>.sqlite; only {', '.join(sorted(KNOWN_MISSING_DBS))} (known missing from the "
                "shared copy) is skipped, or pass --skip_missing_databases to skip any absent database."
            )
    return databases


def _score_one(database: Database, example: Example, prediction: str, columns: set[str] | None, timeout: float,
               max_rows: float, gold_key: tuple | None) -> dict:
    """Exact match, validity and execution match of one prediction."""
    gold_norm_key = (example.gold, example.db_id, example.schema)
    if gold_norm_key not in _NORMALIZED_GOLD:
        _NORMALIZED_GOLD[gold_norm_key] = normalize_sql(example.gold, columns)
    result = {
        "index": example.index,
        "db_id": example.db_id,
        "hardness": example.hardness,
        "question": example.question,
        "gold": example.gold,
        "prediction": prediction,
        "exact_match": bool(prediction.strip()) and normalize_sql(prediction, columns) == _NORMALIZED_GOLD[gold_norm_key],
    }
    error = database.compiles(prediction)
    result["valid_sql"] = error is None
    if gold_key is None:  # schema-only: no rows to execute on
        result["error"] = error
        return result
    if gold_key not in _GOLD_RESULTS:
        _GOLD_RESULTS[gold_key] = database.run(example.gold, timeout=max(timeout, GOLD_TIMEOUT_S), max_rows=max_rows)
    gold = _GOLD_RESULTS[gold_key]
    if gold.error is not None:
        result.update(execution_match=False, error=f"gold query failed: {gold.error}", gold_failed=True)
        return result
    if error is not None:
        result.update(execution_match=False, error=error)
        return result
    match, error = _compare(database, gold, example.gold, prediction, timeout, max_rows)
    result.update(execution_match=match, error=error)
    return result


def score_examples(
    predictions: list[str],
    examples: list[Example],
    spider_dir: str | Path,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_rows: int = DEFAULT_MAX_ROWS,
    skip_missing: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Per-example results on Spider; examples whose database is missing get {"skipped": True}."""
    from tqdm.auto import tqdm

    if len(predictions) != len(examples):
        raise PredictionCountError(f"Got {len(predictions)} predictions, expected {len(examples)} (one per question).")
    databases = check_databases(spider_dir, examples, skip_missing)
    columns = _spider_columns(spider_dir)
    results = []
    pairs = zip(examples, predictions)
    for example, prediction in tqdm(pairs, total=len(examples), desc="Scoring SQL", disable=not progress):
        database = databases[example.db_id]
        if database is None:
            results.append({"index": example.index, "db_id": example.db_id, "hardness": example.hardness, "skipped": True})
            continue
        gold_key = (database.file_key, example.gold)
        results.append(_score_one(database, example, prediction, columns.get(example.db_id), timeout, max_rows, gold_key))
    return results


def _spider_columns(spider_dir: str | Path) -> dict[str, set[str]]:
    tables = json.loads(Path(spider_dir, "tables.json").read_text())
    return {t["db_id"]: {name.lower() for _, name in t["column_names_original"]} for t in tables}


def _rate(results: list[dict], key: str) -> float | None:
    values = [bool(r[key]) for r in results if key in r]
    return sum(values) / len(values) if values else None


def summarize(results: list[dict]) -> dict:
    """The report: overall metrics, counts and the same metrics per Spider hardness level."""
    scored = [r for r in results if not r.get("skipped")]
    skipped_dbs = sorted({r["db_id"] for r in results if r.get("skipped") and r.get("db_id")})
    report = {
        "execution_accuracy": _rate(scored, "execution_match"),
        "exact_match": _rate(scored, "exact_match"),
        "valid_sql_rate": _rate(scored, "valid_sql"),
        "scored": len(scored),
        "skipped": len(results) - len(scored),
        "total": len(results),
        "skipped_databases": skipped_dbs,
        "gold_failures": sum(1 for r in scored if r.get("gold_failed")),
        "by_hardness": {},
    }
    metric = "EX" if report["execution_accuracy"] is not None else "EM"  # schema-only sets have no rows to execute
    report["label"] = f"{metric} on {len(scored):,}/{len(results):,}" + (f" (no {', '.join(skipped_dbs)})" if skipped_dbs else "")
    if any(r.get("hardness") for r in scored):
        for level in LEVELS:
            group = [r for r in scored if r["hardness"] == level]
            report["by_hardness"][level] = {
                "execution_accuracy": _rate(group, "execution_match"),
                "exact_match": _rate(group, "exact_match"),
                "valid_sql_rate": _rate(group, "valid_sql"),
                "count": len(group),
            }
    return report


def score_predictions(predictions: list[str], spider_dir: str | Path, timeout: float = DEFAULT_TIMEOUT_S,
                      limit: int | None = None, max_rows: int = DEFAULT_MAX_ROWS, skip_missing: bool = False,
                      progress: bool = True) -> dict:
    """Report for predictions of all Spider dev questions, or of the first `limit` ones."""
    examples = load_spider(spider_dir, limit)
    if len(predictions) != len(examples):
        raise PredictionCountError(
            f"Got {len(predictions)} predictions, expected {len(examples)} (one per dev question, in dev.json order"
            f"{'' if limit is not None else '; pass limit=N to score only the first N questions'})."
        )
    return summarize(score_examples(predictions, examples, spider_dir, timeout, max_rows, skip_missing, progress))


def score_schema_only_examples(predictions: list[str], examples: list[Example], progress: bool = True) -> list[dict]:
    """Exact match and compile check against an empty in-memory database built from each schema."""
    from tqdm.auto import tqdm

    if len(predictions) != len(examples):
        raise PredictionCountError(f"Got {len(predictions)} predictions, expected {len(examples)} (one per row).")
    built: dict[str, tuple[Database, set[str]] | None] = {}
    results = []
    pairs = zip(examples, predictions)
    for example, prediction in tqdm(pairs, total=len(examples), desc="Scoring SQL", disable=not progress):
        if example.schema not in built:
            try:
                database = Database.from_schema(example.schema)
                built[example.schema] = (database, database.columns())
            except sqlite3.Error:
                built[example.schema] = None  # a context SQLite cannot build says nothing about the prediction
        if built[example.schema] is None:
            results.append({"index": example.index, "db_id": None, "hardness": None, "skipped": True})
        else:
            database, columns = built[example.schema]
            results.append(_score_one(database, example, prediction, columns, DEFAULT_TIMEOUT_S, DEFAULT_MAX_ROWS, None))
    for entry in built.values():
        if entry is not None:
            entry[0].connection.close()
    return results


def score_schema_only(predictions: list[str], rows: list[dict], progress: bool = True) -> dict:
    """Report (exact match, valid SQL rate) for sql-create-context style rows {question, context, answer}."""
    examples = [Example(i, row["question"], row["answer"], row["context"]) for i, row in enumerate(rows)]
    return summarize(score_schema_only_examples(predictions, examples, progress))


# ---------------------------------------------------------------------------------------------
# Model mode: generate with the project's prompt, then score.


def generate_predictions(base: str, adapter: str | None, examples: list[Example], batch_size: int = 8,
                         max_new_tokens: int = 256, load_in_4bit: bool = False) -> list[str]:
    """Greedy SQL for each example, one line each (preds.sql holds one prediction per line)."""
    import gc

    import torch

    from .generate import generate_sql, load_for_inference

    model, tokenizer = load_for_inference(base, adapter, load_in_4bit=load_in_4bit)
    prompts = [build_prompt(example.schema, example.question) for example in examples]
    predictions = generate_sql(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # room for the next model under --compare
    return [p.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").strip() for p in predictions]


def model_runs(base: str, adapter: str | None, compare: bool) -> list[tuple[str, str | None]]:
    """(label, adapter) for each model to evaluate."""
    if compare:
        if not adapter:
            raise InputError("--compare needs --adapter: it compares the base model with base + adapter.")
        return [("base", None), ("adapter", adapter)]
    return [("adapter", adapter)] if adapter else [("base", None)]


def evaluate_model(
    base: str,
    adapter: str | None = None,
    spider_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    compare: bool = False,
    max_new_tokens: int = 256,
    timeout: float = DEFAULT_TIMEOUT_S,
    schema_only: str | Path | None = None,
    load_in_4bit: bool = False,
    skip_missing: bool = False,
) -> dict[str, dict]:
    """Generate and score; returns {"base": report} / {"adapter": report} / both with compare=True.

    Evaluates on Spider dev (`spider_dir`) or a schema-only file (`schema_only`). Inputs are
    checked (databases present and readable) before any model is loaded."""
    if (spider_dir is None) == (schema_only is None):
        raise InputError("Give exactly one of spider_dir (Spider dev) and schema_only (.jsonl of question/context/answer).")
    examples = load_spider(spider_dir, limit) if spider_dir is not None else load_schema_only(schema_only, limit)
    if spider_dir is not None:
        check_databases(spider_dir, examples, skip_missing)
    runs = model_runs(base, adapter, compare)
    reports, details, predictions = {}, {}, {}
    for label, run_adapter in runs:
        print(f"Evaluating {label}: {base}" + (f" + {run_adapter}" if run_adapter else ""), flush=True)
        predictions[label] = generate_predictions(base, run_adapter, examples, batch_size, max_new_tokens, load_in_4bit)
        if spider_dir is not None:
            details[label] = score_examples(predictions[label], examples, spider_dir, timeout, skip_missing=skip_missing)
        else:
            details[label] = score_schema_only_examples(predictions[label], examples)
        reports[label] = summarize(details[label]) | {"model": base, "adapter": run_adapter}
    if out_dir is not None:
        write_outputs(reports, details, out_dir, predictions)
    return reports


# ---------------------------------------------------------------------------------------------
# Outputs: JSON, markdown, chart.


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(reports: dict[str, dict]) -> str:
    """One row per metric and hardness level, one column per model (e.g. base, adapter)."""
    labels = list(reports)
    first = next(iter(reports.values()))
    lines = [f"| metric | {' | '.join(labels)} |", "|---|" + "---:|" * len(labels)]
    metrics = [("execution_accuracy", "execution accuracy"), ("exact_match", "exact match"), ("valid_sql_rate", "valid SQL")]
    for key, name in metrics:
        lines.append(f"| {name} | {' | '.join(_fmt(reports[label][key]) for label in labels)} |")
    for level, stats in first["by_hardness"].items():
        cells = " | ".join(_fmt(reports[label]["by_hardness"][level]["execution_accuracy"]) for label in labels)
        lines.append(f"| EX {level} (n={stats['count']}) | {cells} |")
    header = f"{first['label']}: {first['scored']:,} scored, {first['skipped']:,} skipped of {first['total']:,}."
    return header + "\n\n" + "\n".join(lines) + "\n"


def plot_by_hardness(reports: dict[str, dict], path: str | Path) -> Path | None:
    """Bar chart of execution accuracy by hardness (and overall), models side by side. None without data."""
    import matplotlib

    matplotlib.use("Agg")  # no display on evaluation machines
    import matplotlib.pyplot as plt

    first = next(iter(reports.values()))
    if first["execution_accuracy"] is None or not first["by_hardness"]:
        return None
    groups = [*first["by_hardness"], "all"]
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, report) in enumerate(reports.items()):
        values = [report["by_hardness"][g]["execution_accuracy"] for g in groups[:-1]] + [report["execution_accuracy"]]
        positions = [x + (i - (len(reports) - 1) / 2) * width for x in range(len(groups))]
        bars = ax.bar(positions, [v or 0.0 for v in values], width, label=label)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8, padding=2)
    counts = [first["by_hardness"][g]["count"] for g in groups[:-1]] + [first["scored"]]
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={n})" for g, n in zip(groups, counts)])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("execution accuracy")
    ax.set_title(f"Spider dev, {first['label']}")
    if len(reports) > 1:
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(reports: dict[str, dict], details: dict[str, list[dict]], out_dir: str | Path,
                  predictions: dict[str, list[str]] | None = None) -> Path:
    """report.json, report.md, accuracy_by_hardness.png, per_example.jsonl (+ preds.sql) in out_dir.
    Several models: each gets a subfolder, and out_dir/report.json maps label -> report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    several = len(reports) > 1
    for label, report in reports.items():
        folder = out / label if several else out
        folder.mkdir(exist_ok=True)
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (folder / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in details[label]))
        if predictions is not None:
            (folder / "preds.sql").write_text("".join(p + "\n" for p in predictions[label]))
    if several:
        (out / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
    (out / "report.md").write_text(markdown_table(reports))
    plot_by_hardness(reports, out / "accuracy_by_hardness.png")
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m starsql.evaluate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", help="File of predictions: one SQL per line, in dev.json order.")
    source.add_argument("--model", help="Base model (Hub id, folder, or tiny-starcoder2) to generate predictions with.")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--spider", help="Spider dev folder: dev.json, tables.json, dev_gold.sql, database/.")
    data.add_argument("--schema_only", help="JSON Lines of {question, context, answer}: exact match and compile check only.")
    parser.add_argument("--adapter", help="LoRA adapter (folder or Hub id) on top of --model.")
    parser.add_argument("--compare", action="store_true", help="Evaluate --model alone and with --adapter, side by side.")
    parser.add_argument("--limit", type=int, help="Only the first N questions.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--load_in_4bit", action="store_true", help="Load the base model in 4-bit NF4 for generation.")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="Seconds per predicted query.")
    parser.add_argument("--max_rows", type=int, default=DEFAULT_MAX_ROWS, help="A prediction returning more rows is wrong.")
    parser.add_argument(
        "--skip_missing_databases", action="store_true",
        help=f"Skip questions of any absent database, not only {', '.join(sorted(KNOWN_MISSING_DBS))}.",
    )
    parser.add_argument("--out", default="runs/eval", help="Output folder (default: runs/eval).")
    args = parser.parse_args(argv)
    if args.model is None and (args.adapter or args.compare):
        parser.error("--adapter and --compare need --model.")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1.")
    return args


def _score_file(args) -> dict[str, dict]:
    """Scoring mode: a predictions file against Spider dev or a schema-only set."""
    if args.spider:
        examples = load_spider(args.spider, args.limit)
        predictions = read_predictions(args.predictions, examples)
        details = score_examples(
            predictions, examples, args.spider, args.timeout, args.max_rows, args.skip_missing_databases
        )
    else:
        examples = load_schema_only(args.schema_only, args.limit)
        details = score_schema_only_examples(read_predictions(args.predictions, examples), examples)
    reports = {"predictions": summarize(details) | {"predictions_file": str(args.predictions)}}
    write_outputs(reports, {"predictions": details}, args.out)
    return reports


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        if args.predictions:
            reports = _score_file(args)
        else:
            reports = evaluate_model(
                args.model, args.adapter, args.spider, args.out, args.limit, args.batch_size, args.compare,
                args.max_new_tokens, args.timeout, args.schema_only, args.load_in_4bit, args.skip_missing_databases,
            )
    except (InputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for label, report in reports.items():
        print(f"[{label}] {json.dumps({k: v for k, v in report.items() if k != 'by_hardness'})}")
    print(markdown_table(reports))
    print(f"Wrote {args.out}/ in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
