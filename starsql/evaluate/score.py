"""Scoring: every prediction's exact match, validity and execution match, then the report by hardness.

What a scoring call caches (open databases, gold results, normalised gold SQL) lives in a
ScoringCache that the call owns and closes when it returns, so nothing outlives it. A caller
scoring several prediction sets on the same questions (base and adapter) may pass one cache to
each call to run every gold query once.
"""

import json
import sqlite3
from contextlib import nullcontext
from pathlib import Path

from .hardness import LEVELS
from .metrics import executed_sql, matches_gold, normalize_sql, order_matters, run_gold
from .spider import (
    DEFAULT_MAX_ROWS,
    DEFAULT_TIMEOUT_S,
    KNOWN_MISSING_DBS,
    Database,
    Example,
    MissingDatabaseError,
    Outcome,
    PredictionCountError,
    database_path,
    load_spider,
)


class ScoringCache:
    """Open databases, gold results and normalised gold SQL of one scoring call; `close` ends them."""

    def __init__(self):
        self.databases: dict[str, Database] = {}  # resolved Spider database path -> open connection
        self.schema_databases: dict[str, tuple[Database, set[str]] | None] = {}  # schema-only: None if unbuildable
        self.gold_results: dict[tuple[str, str], tuple[Outcome, bool]] = {}  # (database, gold) -> (result, ordered)
        self.normalized_gold: dict[tuple, str] = {}

    def spider_database(self, path: Path) -> Database:
        key = str(path.resolve())
        if key not in self.databases:
            self.databases[key] = Database.open_read_only(path)
        return self.databases[key]

    def schema_database(self, schema: str) -> tuple[Database, set[str]] | None:
        """An empty in-memory database of `schema` and its column names; None when SQLite cannot build it."""
        if schema not in self.schema_databases:
            try:
                database = Database.from_schema(schema)
                self.schema_databases[schema] = (database, database.columns())
            except sqlite3.Error:
                self.schema_databases[schema] = None  # a context SQLite cannot build says nothing about the prediction
        return self.schema_databases[schema]

    def gold(self, database: Database, gold_sql: str, timeout: float, max_rows: float) -> tuple[Outcome, bool]:
        """The gold query's result on `database`, and whether its row order counts."""
        key = (database.name, gold_sql)
        if key not in self.gold_results:
            self.gold_results[key] = (run_gold(database, gold_sql, timeout, max_rows), order_matters(gold_sql))
        return self.gold_results[key]

    def normalized(self, example: Example, columns: set[str] | None) -> str:
        key = (example.gold, example.db_id, example.schema)
        if key not in self.normalized_gold:
            self.normalized_gold[key] = normalize_sql(example.gold, columns)
        return self.normalized_gold[key]

    def close(self) -> None:
        for database in self.databases.values():
            database.close()
        for entry in self.schema_databases.values():
            if entry is not None:
                entry[0].close()
        self.databases.clear()
        self.schema_databases.clear()
        self.gold_results.clear()
        self.normalized_gold.clear()

    def __enter__(self) -> "ScoringCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _owned(cache: ScoringCache | None):
    """`cache` left open for the caller that owns it, or a new one closed when this call ends."""
    return ScoringCache() if cache is None else nullcontext(cache)


def check_databases(spider_dir: str | Path, examples: list[Example], skip_missing: bool = False,
                    cache: ScoringCache | None = None) -> dict[str, Database | None]:
    """db_id -> open Database (None: skipped). Fails before any scoring when a database is absent or unreadable.

    The databases stay open in `cache`; without one they are only checked, and closed again."""
    databases: dict[str, Database | None] = {}
    with _owned(cache) as cache:
        for db_id in dict.fromkeys(example.db_id for example in examples):
            path = database_path(spider_dir, db_id)
            if path.is_file():
                databases[db_id] = cache.spider_database(path)
            elif db_id in KNOWN_MISSING_DBS or skip_missing:
                databases[db_id] = None
            else:
                raise MissingDatabaseError(
                    f"Database for db_id {db_id!r} not found: {path}. Point --spider at a Spider folder with "
                    f"database/<db_id>/<db_id>.sqlite; only {', '.join(sorted(KNOWN_MISSING_DBS))} (known missing "
                    "from the shared copy) is skipped, or pass --skip_missing_databases to skip any absent database."
                )
    return databases


def _score_one(cache: ScoringCache, database: Database, example: Example, prediction: str, columns: set[str] | None,
               timeout: float = DEFAULT_TIMEOUT_S, max_rows: float = DEFAULT_MAX_ROWS, execute: bool = True,
               keep_distinct: bool = False) -> dict:
    """Exact match, validity and (when `execute`: the database holds rows) execution match of one prediction.

    Exact match and validity look at the prediction as written; execution match runs both queries
    without DISTINCT unless keep_distinct (metrics.remove_distinct)."""
    result = {
        "index": example.index,
        "db_id": example.db_id,
        "hardness": example.hardness,
        "question": example.question,
        "gold": example.gold,
        "prediction": prediction,
        "exact_match": bool(prediction.strip()) and normalize_sql(prediction, columns) == cache.normalized(example, columns),
    }
    error = database.compiles(prediction)
    result["valid_sql"] = error is None
    if not execute:
        result["error"] = error
        return result
    gold, ordered = cache.gold(database, executed_sql(example.gold, keep_distinct), timeout, max_rows)
    if gold.error is not None:
        result.update(execution_match=False, error=f"gold query failed: {gold.error}", gold_failed=True)
        return result
    if error is not None:
        result.update(execution_match=False, error=error)
        return result
    match, error = matches_gold(database, gold.rows, ordered, prediction, timeout, max_rows, keep_distinct)
    result.update(execution_match=match, error=error)
    return result


def _spider_columns(spider_dir: str | Path) -> dict[str, set[str]]:
    tables = json.loads(Path(spider_dir, "tables.json").read_text())
    return {t["db_id"]: {name.lower() for _, name in t["column_names_original"]} for t in tables}


def _skipped(example: Example) -> dict:
    return {"index": example.index, "db_id": example.db_id, "hardness": example.hardness, "skipped": True}


def _scoring(examples: list[Example], predictions: list[str], progress: bool):
    """(example, prediction) pairs under a progress bar."""
    from tqdm.auto import tqdm

    pairs = zip(examples, predictions)
    return tqdm(pairs, total=len(examples), desc="Scoring SQL", disable=not progress)


def score_examples(
    predictions: list[str],
    examples: list[Example],
    spider_dir: str | Path,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_rows: int = DEFAULT_MAX_ROWS,
    skip_missing: bool = False,
    progress: bool = True,
    cache: ScoringCache | None = None,
    keep_distinct: bool = False,
) -> list[dict]:
    """Per-example results on Spider; examples whose database is missing get {"skipped": True}.

    keep_distinct: run gold and predicted SQL as written; by default DISTINCT is removed from both first,
    the test-suite evaluator's default (summarize's report says which)."""
    if len(predictions) != len(examples):
        raise PredictionCountError(f"Got {len(predictions)} predictions, expected {len(examples)} (one per question).")
    with _owned(cache) as cache:
        databases = check_databases(spider_dir, examples, skip_missing, cache)
        columns = _spider_columns(spider_dir)
        results = []
        for example, prediction in _scoring(examples, predictions, progress):
            database = databases[example.db_id]
            if database is None:
                results.append(_skipped(example))
            else:
                results.append(
                    _score_one(cache, database, example, prediction, columns.get(example.db_id), timeout, max_rows,
                               keep_distinct=keep_distinct)
                )
    return results


def score_schema_only_examples(predictions: list[str], examples: list[Example], progress: bool = True,
                               cache: ScoringCache | None = None) -> list[dict]:
    """Exact match and compile check against an empty in-memory database built from each schema."""
    if len(predictions) != len(examples):
        raise PredictionCountError(f"Got {len(predictions)} predictions, expected {len(examples)} (one per row).")
    with _owned(cache) as cache:
        results = []
        for example, prediction in _scoring(examples, predictions, progress):
            built = cache.schema_database(example.schema)
            if built is None:
                results.append(_skipped(example))
            else:
                database, columns = built
                results.append(_score_one(cache, database, example, prediction, columns, execute=False))
    return results


def _rate(results: list[dict], key: str) -> float | None:
    values = [bool(r[key]) for r in results if key in r]
    return sum(values) / len(values) if values else None


def distinct_rule(keep_distinct: bool) -> str:
    """How execution match treated DISTINCT, in words, for reports and the model card."""
    if keep_distinct:
        return "DISTINCT kept in gold and predicted SQL (--keep_distinct)"
    return "DISTINCT removed from gold and predicted SQL before execution (test-suite evaluator's default)"


def summarize(results: list[dict], keep_distinct: bool = False) -> dict:
    """The report: overall metrics, counts and the same metrics per Spider hardness level.

    `keep_distinct` is how the results were scored; a report with execution accuracy records it
    (keep_distinct, distinct) since the two rules give different numbers on Spider dev."""
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
    if report["execution_accuracy"] is not None:
        report.update(keep_distinct=keep_distinct, distinct=distinct_rule(keep_distinct))
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
                      progress: bool = True, keep_distinct: bool = False) -> dict:
    """Report for predictions of all Spider dev questions, or of the first `limit` ones (keep_distinct:
    see score_examples)."""
    examples = load_spider(spider_dir, limit)
    if len(predictions) != len(examples):
        raise PredictionCountError(
            f"Got {len(predictions)} predictions, expected {len(examples)} (one per dev question, in dev.json order"
            f"{'' if limit is not None else '; pass limit=N to score only the first N questions'})."
        )
    results = score_examples(predictions, examples, spider_dir, timeout, max_rows, skip_missing, progress,
                             keep_distinct=keep_distinct)
    return summarize(results, keep_distinct)


def score_schema_only(predictions: list[str], rows: list[dict], progress: bool = True) -> dict:
    """Report (exact match, valid SQL rate) for sql-create-context style rows {question, context, answer}."""
    examples = [Example(i, row["question"], row["answer"], row["context"]) for i, row in enumerate(rows)]
    return summarize(score_schema_only_examples(predictions, examples, progress))
