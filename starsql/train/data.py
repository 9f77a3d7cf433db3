"""Training data: every source becomes prompt/completion pairs (or plain text for raw SQL).

Sources: the Hub (`datasets.load_dataset`) or a local JSON/JSONL/CSV/Parquet file. Formats:
- `sql-create-context`: question / schema (CREATE TABLE text) / SQL columns; the default recipe.
  `--schema_distractors K` adds up to K other tables to each schema (its database's first), because
  the app and Spider show the model whole schemas while this data lists only the tables each answer uses.
- `spider`: question / SQL / db_id, with the whole database's schema, keys included, from Spider's `tables.json`.
- `raw-sql`: SQL code with no question (the original recipe: `bigcode/the-stack-smol`, data/sql).

A recipe may mix several sources (`datasets:`, a YAML list as TRL's own scripts take, each with its
format, columns, split, weight and options): each is prepared alone, then `datasets.interleave_datasets`
draws their training rows in proportion to the weights.

Bad rows are dropped and counted, never silently: the counts, per source, and the prompts' lengths are
printed before training and written into the model card.
"""

import ast
import dataclasses
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..prompt import build_prompt, format_completion
from ..schema import load_spider_schemas, spider_create_tables, split_statements

FORMATS = ("sql-create-context", "spider", "raw-sql")
# Column names each format reads by default; --question_column etc. override them.
DEFAULT_COLUMNS = {
    "sql-create-context": {"question": "question", "schema": "context", "sql": "answer", "db_id": "db_id"},
    "spider": {"question": "question", "sql": "query", "db_id": "db_id"},
    "raw-sql": {"text": "content"},
}
LOCAL_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
APP_FILE = Path(__file__).resolve().parents[2] / "app.py"  # its example databases, for the length report
# A mixture entry's keys: TRL's DatasetConfig names for what load_dataset takes, then this module's options.
SOURCE_KEYS = {"path": "dataset_name", "name": "dataset_config", "data_dir": "dataset_data_dir",
               "split": "dataset_train_split", "eval_split": "dataset_eval_split", "format": "dataset_format"}
SOURCE_OPTIONS = ("spider_tables", "schema_distractors", "strip_sql_comments", "normalize_whitespace")
STOPPING_STRATEGIES = ("all_exhausted", "first_exhausted", "all_exhausted_without_replacement")


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
    schema_distractors: int = field(
        default=0,
        metadata={"help": "sql-create-context: add up to this many other CREATE TABLE statements to each schema (a "
                          "number drawn per row from 0 to K), shuffled in with the row's own: tables of the row's "
                          "database (db_id) first, then tables of other rows; never a second table of the same name."},
    )  # fmt: skip
    distractor_seed: int = field(default=0, metadata={"help": "Seed of the distractor tables' choice and order."})
    datasets: list[dict] = field(
        default_factory=list,
        metadata={"help": "A mixture (a YAML list, in the config; a --dataset_name replaces it): each source {path, format, weight, split, "
                          "name, data_dir, eval_split, columns: {question, schema, sql, db_id, text}, spider_tables, "
                          "schema_distractors}; interleaved by datasets.interleave_datasets in proportion to weight."},
    )  # fmt: skip
    mixture_seed: int = field(default=0, metadata={"help": "Seed of the mixture's interleaving."})
    mixture_stopping_strategy: str = field(
        default="all_exhausted",
        metadata={"help": f"interleave_datasets' stopping_strategy, one of {STOPPING_STRATEGIES}: all_exhausted "
                          "repeats the rows of sources whose weight asks for more rows than they have."},
    )  # fmt: skip
    spider_dev: str | None = field(
        default=None,
        metadata={"help": "Spider dev folder (dev.json, tables.json): the data summary gives the lengths of its "
                          "prompts, whole schemas, beside the training prompts' lengths."},
    )  # fmt: skip

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
    """What happened to the rows between the source and the trainer; a mixture has one per source in `sources`."""

    source: str
    dataset_format: str
    loaded: int = 0
    dropped: Counter = field(default_factory=Counter)
    train_rows: int = 0
    eval_rows: int = 0
    distractors_added: int = 0  # tables added to schemas (--schema_distractors)
    rows_with_distractors: int = 0
    weight: float | None = None  # a mixture's source: its weight, and its rows in the mixed training set
    mixture_rows: int | None = None
    lengths: dict = field(default_factory=dict)  # "train: SOURCE" / "Spider dev" / ... -> percentiles (tokens)
    sources: list["DataReport"] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)  # what dropped rows, in words (the card lists them)
    prompt_tokens: list[int] = field(default_factory=list, repr=False)  # each kept pair's prompt length
    mixture: str | None = None  # how the sources were mixed, in words

    def summary(self) -> str:
        if self.sources:
            lines = [f"Data: a mixture of {len(self.sources)} sources"]
            for report in self.sources:
                lines += ["  " + line for line in report._counts()]
            lines += [f"  mixture: train rows   {self.train_rows:>8,}", f"  mixture: eval rows    {self.eval_rows:>8,}"]
        else:
            lines = self._counts()
        return "\n".join(lines + self._length_lines())

    def _counts(self) -> list[str]:
        lines = [f"Data: {self.source} ({self.dataset_format})", f"  rows loaded          {self.loaded:>8,}"]
        lines += [f"  dropped: {reason:<11} {count:>8,}" for reason, count in sorted(self.dropped.items())]
        if self.distractors_added:
            lines.append(f"  distractor tables    {self.distractors_added:>8,} (in {self.rows_with_distractors:,} rows)")
        lines += [f"  train rows           {self.train_rows:>8,}", f"  eval rows            {self.eval_rows:>8,}"]
        if self.mixture_rows is not None:
            lines.append(f"  in the mixture       {self.mixture_rows:>8,} (weight {self.weight:g})")
        return lines

    def _length_lines(self) -> list[str]:
        if not self.lengths:
            return []
        width = max(map(len, self.lengths))
        lines = [f"  prompt tokens{'':<{width - 11}} {'rows':>7} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}"]
        lines += [f"    {name:<{width}} {p['rows']:>7,} {p['p50']:>6,} {p['p90']:>6,} {p['p99']:>6,} {p['max']:>6,}"
                  for name, p in self.lengths.items()]
        return lines

    def as_dict(self) -> dict:
        counts = {
            "source": self.source,
            "format": self.dataset_format,
            "loaded": self.loaded,
            "dropped": dict(self.dropped),
            "train_rows": self.train_rows,
            "eval_rows": self.eval_rows,
            "distractors_added": self.distractors_added,
            "rows_with_distractors": self.rows_with_distractors,
        }
        if self.mixture_rows is not None:
            counts |= {"weight": self.weight, "mixture_rows": self.mixture_rows}
        if self.sources:
            counts["sources"] = [report.as_dict() for report in self.sources]
            counts["mixture"] = self.mixture
        if self.filters:
            counts["filters"] = self.filters
        if self.lengths:
            counts["prompt_lengths"] = self.lengths
        return counts


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


def load_spider_tables(spec: str) -> dict[str, str]:
    """db_id -> CREATE TABLE text, keys included, for every database of a Spider tables.json: a local file, or a
    URL fsspec opens (`hf://datasets/OWNER/NAME/tables.json`, or a zip's member:
    `zip://spider/tables.json::hf://datasets/OWNER/NAME@REVISION/data/spider.zip`)."""
    if "://" not in spec:
        return load_spider_schemas(spec)
    import fsspec

    with fsspec.open(spec, "rt") as file:
        entries = json.load(file)
    return {entry["db_id"]: spider_create_tables(entry) for entry in entries}


_CREATE_TABLE = re.compile(r'\s*CREATE\s+(?:TEMP(?:ORARY)?\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?'
                           r'("(?:[^"]|"")+"|`[^`]+`|\[[^\]]+\]|[^\s(]+)', re.IGNORECASE)


def table_name(statement: str) -> str | None:
    """The lower-cased name a CREATE TABLE statement creates (SQLite's names ignore case), or None."""
    match = _CREATE_TABLE.match(statement)
    return match.group(1).strip('"`[]').replace('""', '"').lower() if match else None


class DistractorTables:
    """Tables to add to a row's schema so that it looks like the whole schemas the model is prompted with.

    They come from the data itself, not from tables.json: a distractor written unlike the row's own tables
    (keys, other types) would tell the model which tables to skip. For each row: a number of tables drawn
    from 0 to `most`, its own database's tables first (db_id: the fullest version of each), then other
    rows' tables; never a name the schema already has; shuffled in with the row's own tables. The draw
    depends only on the seed and the row's position."""

    def __init__(self, records: list[dict], most: int, seed: int):
        self.most, self.seed = most, seed
        self.by_database: dict[str, dict[str, str]] = {}
        self.pool: list[tuple[str, str]] = []  # (name, statement) of every distinct table in the data
        seen = set()
        for row in records:
            if not isinstance(row.get("schema"), str):
                continue
            db_id = row.get("db_id")
            for statement in split_statements(row["schema"]):
                name = table_name(statement)
                if name is None:
                    continue
                if statement not in seen:
                    seen.add(statement)
                    self.pool.append((name, statement))
                if isinstance(db_id, str) and db_id:
                    tables = self.by_database.setdefault(db_id, {})
                    if name not in tables or statement.count(",") > tables[name].count(","):
                        tables[name] = statement

    def add(self, schema: str, db_id: str | None, position: int) -> tuple[str, int]:
        """(the schema with distractors shuffled in, how many were added)."""
        rng = random.Random(self.seed * 1_000_003 + position)
        own = split_statements(schema)
        names = {table_name(statement) for statement in own}
        wanted = rng.randint(0, self.most)
        same_database = [st for name, st in sorted(self.by_database.get(db_id, {}).items()) if name not in names]
        rng.shuffle(same_database)
        added = same_database[:wanted]
        names |= {table_name(statement) for statement in added}
        for _ in range(4 * wanted):  # other rows' tables; a name already there is skipped, a few times at most
            if len(added) >= wanted or not self.pool:
                break
            name, statement = rng.choice(self.pool)
            if name not in names:
                added.append(statement)
                names.add(name)
        statements = own + added
        rng.shuffle(statements)
        return "\n".join(statement + ";" for statement in statements), len(added)


def check_distractors(args: DataArguments) -> None:
    if args.schema_distractors and (args.schema_distractors < 0 or args.dataset_format != "sql-create-context"):
        raise ValueError(f"schema_distractors {args.schema_distractors} ({args.dataset_name}): a positive count, "
                         "for sql-create-context rows only (spider rows carry their whole database already).")


def to_examples(records: list[dict], args: DataArguments, report: DataReport,
                contamination: tuple[set[str], set[str]] | None = None) -> list[dict]:
    """Normalise rows to {prompt, completion} (pairs) or {text} (raw SQL), dropping bad ones. `contamination`:
    (questions, db_ids) already read from args.contamination_eval (a mixture reads it once for all sources)."""
    schemas = None
    if args.dataset_format == "spider":
        if not args.spider_tables:
            raise ValueError("dataset_format spider needs --spider_tables pointing at Spider's tables.json.")
        schemas = load_spider_tables(args.spider_tables)
    check_distractors(args)
    distractors = DistractorTables(records, args.schema_distractors, args.distractor_seed) if args.schema_distractors else None
    if contamination is None:
        contamination = load_contamination_keys(args.contamination_eval) if args.contamination_eval else (set(), set())
    seen, examples = set(), []
    for position, row in enumerate(records):
        reason, example = _to_example(row, args, schemas, contamination)
        if reason is None:
            dedup_key = tuple(example.values())
            reason = "duplicate" if dedup_key in seen else None
            seen.add(dedup_key)
        if reason:
            report.dropped[reason] += 1
            continue
        if distractors is not None:  # after the duplicate check: copies of a row would get other distractors
            schema, added = distractors.add(row["schema"], row.get("db_id"), position)
            example["prompt"] = build_prompt(schema, row["question"])
            report.distractors_added += added
            report.rows_with_distractors += added > 0
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
    """Pairs whose prompt + SQL + EOS exceed max_length would be cut mid-SQL: drop them. The kept rows' prompt
    lengths (the tokens that start inside the prompt) go to report.prompt_tokens, for the length percentiles."""
    if not examples or "prompt" not in examples[0]:
        return examples  # raw SQL is split across packed sequences instead (bfd_split)
    texts = [ex["prompt"] + ex["completion"] for ex in examples]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    kept = []
    for example, ids, offsets in zip(examples, encoded["input_ids"], encoded["offset_mapping"]):
        if len(ids) + 1 <= max_length:
            kept.append(example)
            report.prompt_tokens.append(sum(1 for start, _ in offsets if start < len(example["prompt"])))
    if len(kept) < len(examples):
        report.dropped[f"over {max_length} tokens"] += len(examples) - len(kept)
    return kept


# -- Prompt lengths: the training prompts beside the prompts the model will see (Spider dev, the app's examples).

def length_percentiles(tokenizer, texts: list[str] = (), lengths: list[int] | None = None) -> dict[str, int]:
    """Rows, p50/p90/p99 (each a length some row has) and the longest, in tokens, of `texts` or of `lengths`."""
    import numpy as np

    if lengths is None:
        lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    lengths = np.array(lengths)
    return {"rows": len(lengths), **{f"p{q}": int(np.percentile(lengths, q, method="higher")) for q in (50, 90, 99)},
            "max": int(lengths.max())}


def spider_dev_prompts(spider_dev: str | Path) -> list[str]:
    """Spider dev's prompts as evaluation builds them: each question with its database's whole schema."""
    folder = Path(spider_dev)
    if not (folder / "dev.json").is_file():
        raise FileNotFoundError(f"spider_dev {folder}: no dev.json there; point it at Spider's dev folder.")
    schemas = load_spider_schemas(folder / "tables.json")
    return [build_prompt(schemas[entry["db_id"]], entry["question"])
            for entry in json.loads((folder / "dev.json").read_text()) if entry["db_id"] in schemas]


def app_example_prompts(app_file: Path = APP_FILE) -> list[str]:
    """The prompts of the app's example questions, read from app.py's source (importing it loads a model):
    its module-level strings (the example databases) and EXAMPLES, a list of (label, question, database)."""
    if not app_file.is_file():
        return []
    strings, examples = {}, []
    for node in ast.parse(app_file.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                strings[node.targets[0].id] = node.value.value
            elif node.targets[0].id == "EXAMPLES" and isinstance(node.value, ast.List):
                examples = node.value.elts
    value = lambda node: node.value if isinstance(node, ast.Constant) else strings.get(getattr(node, "id", None))  # noqa: E731
    prompts = []
    for example in examples:
        question, database = (value(part) for part in example.elts[1:3])
        if isinstance(question, str) and isinstance(database, str):  # the app prompts with the CREATE statements only
            schema = "\n".join(s for s in split_statements(database) if s.lstrip().upper().startswith("CREATE"))
            prompts.append(build_prompt(schema, question))
    return prompts


def prompt_lengths(tokenizer, sources: list[tuple[str, list[int]]], spider_dev: str | None) -> dict[str, dict]:
    """Percentiles of the training prompts (each source's prompt lengths) and of those the model will be asked."""
    lengths = {f"train: {name}": length_percentiles(tokenizer, lengths=counts) for name, counts in sources if counts}
    if not lengths:
        return {}  # raw SQL: no prompts
    if spider_dev:
        lengths["Spider dev (whole schemas)"] = length_percentiles(tokenizer, spider_dev_prompts(spider_dev))
    app_prompts = app_example_prompts()
    if app_prompts:
        lengths["app examples"] = length_percentiles(tokenizer, app_prompts)
    return lengths


# -- One source, or a mixture of several.

def mixture_sources(args: DataArguments) -> list[tuple[DataArguments, float]]:
    """(DataArguments of one source, weight) for each source: args itself, or each entry of `datasets`, with
    what it loads, its format, columns and options (the rest, e.g. contamination_eval, is the recipe's)."""
    if not args.datasets or args.dataset_name != DataArguments.dataset_name:
        return [(args, 1.0)]  # a dataset_name of its own (`--dataset_name data.jsonl`) replaces a config's mixture
    if args.mixture_stopping_strategy not in STOPPING_STRATEGIES:
        raise ValueError(f"mixture_stopping_strategy {args.mixture_stopping_strategy!r}: use one of {', '.join(STOPPING_STRATEGIES)}.")
    allowed = sorted([*SOURCE_KEYS, *SOURCE_OPTIONS, "columns", "weight"])
    sources = []
    for number, entry in enumerate(args.datasets, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"datasets entry {number} must be a mapping with a `path` (a Hub id or a local file), got {entry!r}.")
        unknown = sorted(set(entry) - set(allowed))
        columns = entry.get("columns") or {}
        roles = ("question", "schema", "sql", "db_id", "text")
        if unknown or not isinstance(columns, dict) or set(columns) - set(roles):
            raise ValueError(f"datasets entry {number} ({entry['path']}): unknown key(s) {unknown or sorted(columns)}. "
                             f"An entry takes {', '.join(allowed)}; `columns` maps {', '.join(roles)} to column names.")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"datasets entry {number} ({entry['path']}): weight must be a positive number, got {weight!r}.")
        overrides = {"datasets": [], "dataset_config": None, "dataset_data_dir": None, "dataset_train_split": "train",
                     "dataset_eval_split": None, **{f"{role}_column": columns.get(role) for role in roles}}
        overrides |= {SOURCE_KEYS[key]: value for key, value in entry.items() if key in SOURCE_KEYS}
        source = dataclasses.replace(args, **overrides, **{key: entry[key] for key in SOURCE_OPTIONS if key in entry})
        source.columns()  # a bad format fails here, naming the formats
        sources.append((source, float(weight)))
    if len({source.dataset_format == "raw-sql" for source, _ in sources}) > 1:
        raise ValueError("A mixture cannot mix raw-sql with question/SQL pairs: the trainer takes one kind of row.")
    return sources


def prepare_source(args: DataArguments, tokenizer, max_length: int, contamination):
    """(train examples, eval examples or None, DataReport) of one source: loaded, filtered, split."""
    check_distractors(args)  # before a download
    report = DataReport(source=args.dataset_name, dataset_format=args.dataset_format)
    records = load_records(args, args.dataset_train_split)
    report.loaded = len(records)
    train = drop_too_long(to_examples(records, args, report, contamination), tokenizer, max_length, report)
    if not train:
        raise ValueError(f"No usable training rows left in {args.dataset_name}.\n{report.summary()}")
    eval_ = None
    if args.dataset_eval_split:
        eval_records = load_records(args, args.dataset_eval_split)
        report.loaded += len(eval_records)
        eval_ = drop_too_long(to_examples(eval_records, args, report, contamination), tokenizer, max_length, report)
    elif args.eval_fraction > 0:
        if not 0 < args.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be between 0 and 1, got {args.eval_fraction}.")
        if len(train) < 2:
            raise ValueError(f"Too few rows in {args.dataset_name} to hold out an eval split: set --eval_fraction 0.")
        from datasets import Dataset

        split = Dataset.from_list(train).train_test_split(test_size=args.eval_fraction, seed=args.eval_split_seed)
        train, eval_ = split["train"].to_list(), split["test"].to_list()
    report.train_rows, report.eval_rows = len(train), len(eval_) if eval_ is not None else 0
    return train, eval_, report


def interleave(trains: list, weights: list[float], args: DataArguments):
    """The sources' training rows drawn in proportion to their weights (datasets.interleave_datasets, seeded),
    and how many rows of each the mixture holds."""
    from datasets import interleave_datasets

    tagged = [train.add_column("source", [index] * len(train)) for index, train in enumerate(trains)]
    mixed = interleave_datasets(tagged, probabilities=[w / sum(weights) for w in weights], seed=args.mixture_seed,
                                stopping_strategy=args.mixture_stopping_strategy)
    if args.max_train_rows is not None:
        mixed = mixed.select(range(min(args.max_train_rows, len(mixed))))
    counts = Counter(mixed.select_columns(["source"]).with_format("numpy")[:]["source"].tolist())
    return mixed.remove_columns("source"), [counts.get(index, 0) for index in range(len(trains))]


def prepare_datasets(args: DataArguments, tokenizer, max_length: int):
    """(train Dataset, eval Dataset or None, DataReport): the whole data half of training."""
    from datasets import Dataset

    contamination = load_contamination_keys(args.contamination_eval) if args.contamination_eval else (set(), set())
    sources = mixture_sources(args)
    prepared = [prepare_source(source, tokenizer, max_length, contamination) for source, _ in sources]
    names = [f"{Path(report.source).name if Path(report.source).is_file() else report.source} ({report.dataset_format})"
             for _, _, report in prepared]
    if len(set(names)) < len(names):
        names = [f"{number}. {name}" for number, name in enumerate(names, 1)]
    lengths = prompt_lengths(tokenizer, [(name, report.prompt_tokens) for name, (_, _, report) in zip(names, prepared)],
                             args.spider_dev)
    evals = [example for _, eval_, _ in prepared for example in eval_ or []]
    eval_ = Dataset.from_list(evals) if any(e is not None for _, e, _ in prepared) else None
    if len(prepared) == 1:
        train, _, report = prepared[0]
        train = Dataset.from_list(train)
        if args.max_train_rows is not None:
            train = train.select(range(min(args.max_train_rows, len(train))))
    else:
        reports = [report for _, _, report in prepared]
        train, counts = interleave([Dataset.from_list(t) for t, _, _ in prepared], [w for _, w in sources], args)
        for report, (_, weight), count in zip(reports, sources, counts):
            report.weight, report.mixture_rows = weight, count
        formats = sorted({report.dataset_format for report in reports})
        report = DataReport(source=", ".join(r.source for r in reports), dataset_format=", ".join(formats),
                            loaded=sum(r.loaded for r in reports), sources=reports,
                            dropped=sum((r.dropped for r in reports), Counter()),
                            distractors_added=sum(r.distractors_added for r in reports),
                            rows_with_distractors=sum(r.rows_with_distractors for r in reports))
        report.mixture = (f"datasets.interleave_datasets, weights {', '.join(f'{w:g}' for _, w in sources)}, "
                          f"seed {args.mixture_seed}, stopping strategy {args.mixture_stopping_strategy}")
    report.train_rows, report.eval_rows = len(train), len(eval_) if eval_ is not None else 0
    report.lengths = lengths
    report.filters = ["empty or non-string fields", "exact duplicates"]
    if report.dataset_format != "raw-sql":
        report.filters.append(f"prompt + SQL + EOS over {max_length} tokens")
    if args.contamination_eval:
        report.filters.append(f"questions or databases shared with {args.contamination_eval}")
    return train, eval_, report
