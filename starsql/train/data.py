"""Training data: every source becomes prompt/completion pairs (or plain text for raw SQL).

Sources: the Hub (`datasets.load_dataset`) or a local JSON/JSONL/CSV/Parquet file. Formats:
- `sql-create-context`: question / schema (CREATE TABLE text) / SQL columns; the default recipe.
- `spider`: question / SQL / db_id, with the schema rendered from Spider's `tables.json`.
- `raw-sql`: SQL code with no question (the original recipe: `bigcode/the-stack-smol`, data/sql).

Bad rows are dropped and counted, never silently: the counts are printed before training and
written into the model card.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..prompt import build_prompt, format_completion
from ..schema import load_spider_schemas

FORMATS = ("sql-create-context", "spider", "raw-sql")
# Column names each format reads by default; --question_column etc. override them.
DEFAULT_COLUMNS = {
    "sql-create-context": {"question": "question", "schema": "context", "sql": "answer", "db_id": "db_id"},
    "spider": {"question": "question", "sql": "query", "db_id": "db_id"},
    "raw-sql": {"text": "content"},
}
LOCAL_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="b-mc2/sql-create-context",
        metadata={"help": "Hub dataset id, or a local .json/.jsonl/.csv/.parquet file."},
    )
    dataset_format: str = field(default="sql-create-context", metadata={"help": f"One of {FORMATS}."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_data_dir: str | None = field(default=None, metadata={"help": "Hub dataset data_dir, e.g. data/sql."})
    dataset_train_split: str = field(default="train")
    dataset_eval_split: str | None = field(
        default=None, metadata={"help": "Named eval split; when unset, `eval_fraction` of train is held out."}
    )
    eval_fraction: float = field(default=0.05, metadata={"help": "Held-out fraction when no eval split is named."})
    eval_split_seed: int = field(default=0, metadata={"help": "Seed of the held-out split."})
    question_column: str | None = None
    schema_column: str | None = None
    sql_column: str | None = None
    db_id_column: str | None = None
    text_column: str | None = None
    spider_tables: str | None = field(default=None, metadata={"help": "Spider tables.json (spider format)."})
    strip_sql_comments: bool = field(default=True, metadata={"help": "raw-sql: remove -- and /* */ comments."})
    normalize_whitespace: bool = field(default=True, metadata={"help": "raw-sql: trim lines, squeeze blank lines."})
    contamination_eval: str | None = field(
        default=None,
        metadata={"help": "Evaluation set (e.g. Spider dev.json): drop training rows sharing a question or db_id."},
    )
    max_train_rows: int | None = field(default=None, metadata={"help": "Keep at most this many training rows."})

    def columns(self) -> dict[str, str]:
        if self.dataset_format not in FORMATS:
            raise ValueError(f"Unknown dataset_format {self.dataset_format!r}: use one of {', '.join(FORMATS)}.")
        overrides = {
            "question": self.question_column,
            "schema": self.schema_column,
            "sql": self.sql_column,
            "db_id": self.db_id_column,
            "text": self.text_column,
        }
        columns = dict(DEFAULT_COLUMNS[self.dataset_format])
        columns.update({role: name for role, name in overrides.items() if name and role in columns})
        return columns


@dataclass
class DataReport:
    """What happened to the rows between the source and the trainer."""

    source: str
    dataset_format: str
    loaded: int = 0
    dropped: Counter = field(default_factory=Counter)
    train_rows: int = 0
    eval_rows: int = 0

    def summary(self) -> str:
        lines = [f"Data: {self.source} ({self.dataset_format})", f"  rows loaded          {self.loaded:>8,}"]
        lines += [f"  dropped: {reason:<11} {count:>8,}" for reason, count in sorted(self.dropped.items())]
        lines += [f"  train rows           {self.train_rows:>8,}", f"  eval rows            {self.eval_rows:>8,}"]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.dataset_format,
            "loaded": self.loaded,
            "dropped": dict(self.dropped),
            "train_rows": self.train_rows,
            "eval_rows": self.eval_rows,
        }


def load_records(args: DataArguments, split: str) -> list[dict]:
    """Rows of one split with only the columns the format needs, as plain Python values."""
    columns = args.columns()
    path = Path(args.dataset_name)
    if path.suffix.lower() in LOCAL_LOADERS and not path.is_file():
        raise FileNotFoundError(f"Dataset file not found: {path}")
    if path.is_file():
        available, rows = _read_local(path)
    else:
        available, rows = _read_hub(args, split)
    if not rows:
        raise ValueError(f"Dataset {args.dataset_name} (split {split!r}) has no rows.")
    required = [name for role, name in columns.items() if role != "db_id"]
    missing = [name for name in required if name not in available]
    if missing:
        flag = {v: k for k, v in columns.items()}
        hints = ", ".join(f"--{flag[name]}_column" for name in missing)
        raise ValueError(
            f"Column(s) {missing} not found in {args.dataset_name} (format {args.dataset_format}). "
            f"Available columns: {sorted(available)}. Set {hints} to the right names."
        )
    return [{role: row.get(name) for role, name in columns.items()} for row in rows]


def _read_local(path: Path) -> tuple[set[str], list[dict]]:
    suffix = path.suffix.lower()
    if suffix not in LOCAL_LOADERS:
        raise ValueError(f"Unsupported data file {path}: use one of {', '.join(LOCAL_LOADERS)}.")
    if suffix in (".json", ".jsonl"):
        # Read by hand: Spider's files are JSON arrays with nested, irregular fields Arrow cannot type.
        text = path.read_text()
        try:
            rows = json.loads(text) if text.strip() else []
        except json.JSONDecodeError:
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is neither a JSON array nor JSON Lines: {error}") from error
        if isinstance(rows, dict):
            rows = [rows]
    elif path.stat().st_size == 0:
        rows = []
    else:
        from datasets import load_dataset

        rows = load_dataset(LOCAL_LOADERS[suffix], data_files=str(path), split="train").to_list()
    available = set().union(*(row.keys() for row in rows)) if rows else set()
    return available, rows


def _read_hub(args: DataArguments, split: str) -> tuple[set[str], list[dict]]:
    from datasets import load_dataset

    dataset = load_dataset(args.dataset_name, name=args.dataset_config, data_dir=args.dataset_data_dir, split=split)
    available = set(dataset.column_names)
    wanted = [name for name in args.columns().values() if name in available]
    return available, dataset.select_columns(wanted).to_list()


# Strings first so that `--` inside a literal is kept; then comments, which are removed.
_SQL_COMMENT = re.compile(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")|(--[^\n]*|/\*.*?\*/)", re.DOTALL)


def strip_sql_comments(sql: str) -> str:
    return _SQL_COMMENT.sub(lambda m: m.group(1) or "", sql)


def normalize_sql_whitespace(sql: str) -> str:
    lines = [line.rstrip() for line in sql.replace("\t", "    ").splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def normalize_question(question: str) -> str:
    """The key that decides whether two questions are the same, for the contamination filter."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", question.lower()).split())


def load_contamination_keys(path: str | Path) -> tuple[set[str], set[str]]:
    """(normalised questions, db_ids) of an evaluation set in JSON or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Contamination eval set not found: {path}")
    _, rows = _read_local(path)
    questions = {normalize_question(r["question"]) for r in rows if isinstance(r.get("question"), str)}
    db_ids = {r["db_id"] for r in rows if isinstance(r.get("db_id"), str)}
    if not questions and not db_ids:
        raise ValueError(f"{path} has no `question` or `db_id` fields to filter against.")
    return questions, db_ids


def to_examples(records: list[dict], args: DataArguments, report: DataReport) -> list[dict]:
    """Normalise rows to {prompt, completion} (pairs) or {text} (raw SQL), dropping bad ones."""
    schemas = None
    if args.dataset_format == "spider":
        if not args.spider_tables:
            raise ValueError("dataset_format spider needs --spider_tables pointing at Spider's tables.json.")
        schemas = load_spider_schemas(args.spider_tables)
    keys = load_contamination_keys(args.contamination_eval) if args.contamination_eval else (set(), set())
    seen, examples = set(), []
    for row in records:
        reason, example = _to_example(row, args, schemas, keys)
        if reason is None:
            dedup_key = tuple(example.values())
            reason = "duplicate" if dedup_key in seen else None
            seen.add(dedup_key)
        if reason:
            report.dropped[reason] += 1
        else:
            examples.append(example)
    return examples


def _to_example(row, args, schemas, contamination) -> tuple[str | None, dict | None]:
    fields_ = [role for role in row if role != "db_id"]
    for role in fields_:
        value = row[role]
        if value is None or (isinstance(value, str) and not value.strip()):
            return "empty field", None
        if not isinstance(value, str):
            return "not a string", None
    if args.dataset_format == "raw-sql":
        text = row["text"]
        text = strip_sql_comments(text) if args.strip_sql_comments else text
        text = normalize_sql_whitespace(text) if args.normalize_whitespace else text
        return ("empty field", None) if not text.strip() else (None, {"text": text})
    questions, db_ids = contamination
    db_id = row.get("db_id")
    if normalize_question(row["question"]) in questions or (isinstance(db_id, str) and db_id in db_ids):
        return "contaminated", None
    if schemas is not None:
        if db_id not in schemas:
            return "unknown db_id", None
        schema = schemas[db_id]
    else:
        schema = row["schema"]
    return None, {"prompt": build_prompt(schema, row["question"]), "completion": format_completion(row["sql"])}


def drop_too_long(examples: list[dict], tokenizer, max_length: int, report: DataReport) -> list[dict]:
    """Pairs whose prompt + SQL + EOS exceed max_length would be cut mid-SQL: drop them."""
    if not examples or "prompt" not in examples[0]:
        return examples  # raw SQL is split across packed sequences instead (bfd_split)
    texts = [ex["prompt"] + ex["completion"] for ex in examples]
    lengths = [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    kept = [ex for ex, n in zip(examples, lengths) if n <= max_length]
    if len(kept) < len(examples):
        report.dropped[f"over {max_length} tokens"] += len(examples) - len(kept)
    return kept


def prepare_datasets(args: DataArguments, tokenizer, max_length: int):
    """(train Dataset, eval Dataset or None, DataReport): the whole data half of training."""
    from datasets import Dataset

    report = DataReport(source=args.dataset_name, dataset_format=args.dataset_format)
    records = load_records(args, args.dataset_train_split)
    report.loaded = len(records)
    train = drop_too_long(to_examples(records, args, report), tokenizer, max_length, report)
    if not train:
        raise ValueError(f"No usable training rows left in {args.dataset_name}.\n{report.summary()}")
    eval_ = None
    if args.dataset_eval_split:
        eval_records = load_records(args, args.dataset_eval_split)
        report.loaded += len(eval_records)
        eval_ = Dataset.from_list(drop_too_long(to_examples(eval_records, args, report), tokenizer, max_length, report))
    train = Dataset.from_list(train)
    if eval_ is None and args.eval_fraction > 0:
        if not 0 < args.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be between 0 and 1, got {args.eval_fraction}.")
        if len(train) < 2:
            raise ValueError("Too few rows to hold out an eval split: set --eval_fraction 0.")
        split = train.train_test_split(test_size=args.eval_fraction, seed=args.eval_split_seed)
        train, eval_ = split["train"], split["test"]
    if args.max_train_rows is not None:
        train = train.select(range(min(args.max_train_rows, len(train))))
    report.train_rows, report.eval_rows = len(train), len(eval_) if eval_ is not None else 0
    return train, eval_, report
