"""Proof that the pipeline learns: pretrain a small StarCoder2 from scratch on SQL, fine-tune it with
the project's recipes, score them on Spider dev with the project's harness.

Real StarCoder2 weights cannot be downloaded here, so the base model is made: a ~27M-parameter
StarCoder2 pretrained (full fine-tuning of a random init through train_sft.py's raw-sql path) on
Spider's *training* SQL and schemas. Then `train_sft.py --config configs/starcoder2-3b-sql.yaml`
(QLoRA, packed 2,048-token rows, completion-only loss) on the 3,961 sql-create-context rows from Spider's
training databases, contamination-filtered against Spider dev, and `--eval_spider` scores base vs
adapter. A bug in masking, packing, EOS, the prompt or SQL extraction shows up as no gain.
`--heldout` rows of sql-create-context (new questions on the training databases) stay out of both
pretraining and fine-tuning and are scored schema-only (exact match, SQL that compiles), base vs adapter.

Recipes (`--sft_formats`), each the recommended config with only its data changed, so every run trains
the same steps of the same packed rows from the same base: `sql-create-context` (the old recipe: each
answer's own tables only), `mixture` (the new one: those schemas with distractor tables, mixed with the
same questions on whole schemas with keys, as the recommended config mixes its sources) and `spider`
(whole schemas only). Every run is also scored by the share of answers whose FROM/JOIN tables are
exactly the gold query's (sqlglot), a measure a small model can move; runs are compared question by
question with the first (`recipes` in proof.json: exact McNemar / sign test on the discordant pairs).

    python bench/learning_proof.py --shared ../shared --out runs/proof            # one GPU, minutes
    python bench/learning_proof.py --shared ../shared --out runs/proof-smoke --smoke   # CPU, wiring only

The same command again with the same `--out` goes on where a run stopped (a time limit, a SIGTERM): a
finished pretraining and finished recipes are reused, and an interrupted fine-tuning resumes from its
last checkpoint, so a run longer than one session's command limit completes in two.
"""

import argparse
import json
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import sqlglot
import yaml
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "starcoder2-3b-sql.yaml"
sys.path.insert(0, str(ROOT))

import train_sft  # noqa: E402
from starsql.schema import spider_create_tables  # noqa: E402
from starsql.tiny import EOS  # noqa: E402


def made_up_names(count: int, rng: random.Random) -> list[str]:
    """`count` distinct pronounceable non-words ("dobeka", "rilo_vantu"): names the model cannot have
    memorised, so the only way to predict them is to copy them from the schema and the question."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    keywords = {k.lower() for k in sqlglot.tokens.Tokenizer.KEYWORDS}
    names: set[str] = set()
    while len(names) < count:
        word = lambda: "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))  # noqa: E731
        name = word() if rng.random() < 0.6 else word() + "_" + word()
        if name not in keywords:  # an unquoted identifier must not be SQL
            names.add(name)
    return sorted(names)


def rename_database(table: dict, items: list[tuple[str | None, "sqlglot.exp.Expression"]], pool: list[str],
                    rng: random.Random, made_up_fraction: float = 0.0) -> tuple[dict, list[tuple[str | None, str]]]:
    """The same database with every table and column renamed, consistently in the schema, the queries
    and the questions' words for them ("singers" -> "vehicles" when `singer` becomes `vehicle`).

    A small model trained on 140 schemas memorises them; renamed copies force it to read the
    identifiers from the schema in front of it and copy the ones the question names, which is
    what unseen Spider dev databases need. (Made-up names, meant to leave copying as the only way
    to predict them, did worse than real ones: BENCHMARKS.md.)"""
    from sqlglot import exp

    names = {n.lower() for n in table["table_names_original"]} | {c.lower() for _, c in table["column_names_original"][1:]}
    # Real identifiers of other databases, or (a `made_up_fraction` of the copies) made-up words.
    made_up = made_up_fraction > 0 and rng.random() < made_up_fraction  # no draw at 0: same corpus as before
    new_names = made_up_names(len(names), rng) if made_up else rng.sample(pool, len(names))
    mapping = dict(zip(sorted(names), new_names))
    renamed = dict(table)
    renamed["table_names_original"] = [mapping[n.lower()] for n in table["table_names_original"]]
    renamed["column_names_original"] = [[i, c if i < 0 else mapping[c.lower()]] for i, c in table["column_names_original"]]
    # Words of the question that spell an identifier ("born state" for born_state), with a plural s.
    spelled = {n.replace("_", " "): mapping[n].replace("_", " ") for n in mapping if len(n) > 2}
    words = re.compile(r"\b(" + "|".join(map(re.escape, sorted(spelled, key=len, reverse=True))) + r")(e?s)?\b", re.IGNORECASE)
    renamed_items = []
    for question, tree in items:
        tree = tree.copy()
        for node in list(tree.find_all(exp.Table, exp.Column)):
            if node.name.lower() in mapping:
                node.set("this", exp.to_identifier(mapping[node.name.lower()]))
        if question is not None and spelled:
            question = words.sub(lambda m: spelled[m.group(1).lower()] + (m.group(2) or ""), question)
        renamed_items.append((question, tree.sql(dialect="sqlite") + ";"))
    return renamed, renamed_items


def render_items(items: list[tuple[str | None, str]]) -> str:
    """Queries as a SQL file has them; a question becomes a block comment above its query. (Not the
    prompt template's `-- Question:` lines: teaching that format is the fine-tuning's job.)"""
    return "\n".join(sql if question is None else f"/* {question} */\n{sql}" for question, sql in items)


def sql_key(tree) -> str:
    """One spelling per query (quotes, case, spaces), to find a held-out answer among the training SQL."""
    return " ".join(tree.sql(dialect="sqlite").lower().split())


def pretraining_corpus(shared: Path, out: Path, renamed_copies: int = 64, seed: int = 0, made_up_fraction: float = 0.0,
                       heldout: list[dict] = (), every: int = 1) -> Path:
    """Documents of Spider's training databases: the schema, then queries on it, some with the
    question they answer as a comment. Each database appears with its own names (queries only) and
    in `renamed_copies` renamed copies (queries and questions). Nothing from Spider dev, and neither
    the questions nor the SQL of the `heldout` rows. `every`: read only every n-th query and question (a smoke
    run's corpus: parsing them all is most of its time)."""
    held_questions = {(row["db_id"], row["question"]) for row in heldout}
    held_sql = {sql_key(sqlglot.parse_one(row["answer"], read="sqlite")) for row in heldout}
    dev_dbs = {e["db_id"] for e in json.loads((shared / "spider_dev" / "dev.json").read_text())}
    tables = {t["db_id"]: t for t in json.loads((shared / "spider_dev" / "tables.json").read_text())}
    queries, questions = defaultdict(list), defaultdict(list)
    for line in tqdm((shared / "spider_train_gold.sql").read_text().splitlines()[::every], desc="Parsing training SQL"):
        sql, db_id = line.rsplit("\t", 1)
        if db_id not in dev_dbs:
            try:
                tree = sqlglot.parse_one(sql, read="sqlite")
            except sqlglot.errors.ParseError:
                continue
            if sql_key(tree) not in held_sql:
                queries[db_id].append((None, tree))
    for row in json.loads((shared / "sql_create_context_spider" / "train.json").read_text())[::every]:
        if row["db_id"] not in dev_dbs and (row["db_id"], row["question"]) not in held_questions:
            try:
                tree = sqlglot.parse_one(row["answer"], read="sqlite")
            except sqlglot.errors.ParseError:
                continue
            if sql_key(tree) not in held_sql:
                questions[row["db_id"]].append((" ".join(row["question"].split()), tree))
    keywords = {k.lower() for k in sqlglot.tokens.Tokenizer.KEYWORDS}
    pool = sorted({n for db_id in queries for n in tables[db_id]["table_names_original"]}
                  | {c for db_id in queries for _, c in tables[db_id]["column_names_original"][1:]})
    pool = [n for n in pool if n.replace("_", "").isalnum() and not n[0].isdigit() and n.lower() not in keywords]
    rng = random.Random(seed)
    docs = []
    for db_id in tqdm(sorted(queries), desc="Pretraining corpus"):
        for copy in range(8 + renamed_copies):
            if copy < 8:
                sample = rng.sample(queries[db_id], min(12, len(queries[db_id])))
                table, items = tables[db_id], [(None, tree.sql(dialect="sqlite") + ";") for _, tree in sample]
            else:
                sample = rng.sample(queries[db_id], min(4, len(queries[db_id])))
                sample += rng.sample(questions[db_id], min(8, len(questions[db_id])))
                rng.shuffle(sample)
                table, items = rename_database(tables[db_id], sample, pool, rng, made_up_fraction)
            docs.append({"content": spider_create_tables(table) + "\n\n" + render_items(items)})
    rng.shuffle(docs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return out


def split_heldout(shared: Path, out: Path, count: int, seed: int = 0) -> tuple[Path, Path, list[dict]]:
    """Hold out `count` sql-create-context rows: new questions on the training databases. Fine-tuning
    and pretraining never see them (nor their SQL); the schema-only harness scores them by exact match
    and by whether the SQL compiles against the schema. Unlike Spider dev, the databases are familiar,
    so a pipeline that learns shows it here even when a small model cannot yet generalise to new ones.
    Returns (training rows file, held-out file with the full schemas Spider dev is prompted with, held-out rows)."""
    rows = json.loads((shared / "sql_create_context_spider" / "train.json").read_text())
    tables = {t["db_id"]: t for t in json.loads((shared / "spider_dev" / "tables.json").read_text())}
    picked = set(random.Random(seed).sample(range(len(rows)), count)) if count else set()
    heldout = [rows[i] for i in sorted(picked)]
    keys = [sql_key(sqlglot.parse_one(row["answer"], read="sqlite")) for row in rows]
    held_sql = {keys[i] for i in picked}
    # Paraphrases of a held-out question share its SQL: they leave the training rows too.
    train = [row for row, key in zip(rows, keys) if key not in held_sql]
    out.mkdir(parents=True, exist_ok=True)
    train_file, heldout_file = out / "sft_train.json", out / "heldout_full_schema.jsonl"
    train_file.write_text(json.dumps(train))
    heldout_file.write_text("".join(json.dumps({"question": row["question"], "answer": row["answer"],
                                                "context": spider_create_tables(tables[row["db_id"]])}) + "\n"
                                    for row in heldout))  # fmt: skip
    print(f"Held out {len(heldout)} rows (and {len(rows) - len(heldout) - len(train)} paraphrases of them); "
          f"fine-tuning on {len(train)}")
    return train_file, heldout_file, heldout


def build_base(shared: Path, out: Path, smoke: bool, hidden: int = 512, layers: int = 8) -> Path:
    """A fresh StarCoder2 (random init) and a BPE tokenizer trained on the SQL, schemas and questions."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Starcoder2Config, Starcoder2ForCausalLM

    texts = [line.rsplit("\t", 1)[0] for line in (shared / "spider_train_gold.sql").read_text().splitlines()]
    texts += [spider_create_tables(t) for t in json.loads((shared / "spider_dev" / "tables.json").read_text())]
    texts += [r["question"] for r in json.loads((shared / "sql_create_context_spider" / "train.json").read_text())]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048 if smoke else 8192, special_tokens=[EOS],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    size = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4) if smoke else \
        dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64)
    torch.manual_seed(0)
    config = Starcoder2Config(vocab_size=len(fast), num_key_value_heads=size["num_attention_heads"] // 2,
                              max_position_embeddings=2048, bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id,
                              use_bias=True, tie_word_embeddings=True, **size)
    model = Starcoder2ForCausalLM(config)
    print(f"Base model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocab {len(fast)}")
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def exact_mcnemar(first_only: int, second_only: int) -> float:
    """Two-sided exact McNemar p (the sign test on the discordant pairs): how likely so lopsided a split of
    the questions that changed, were either side as likely."""
    from math import comb

    changed, fewer = first_only + second_only, min(first_only, second_only)
    return min(1.0, 2 * sum(comb(changed, i) for i in range(fewer + 1)) / 2**changed) if changed else 1.0


def read_per_example(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "per_example.jsonl").read_text().splitlines()]


def query_tables(sql: str) -> frozenset[str] | None:
    """The tables a query reads (FROM, JOIN, subqueries), lower-cased; None when sqlglot cannot parse it."""
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except (sqlglot.errors.ParseError, sqlglot.errors.TokenError, ValueError):
        return None
    return frozenset(table.name.lower() for table in tree.find_all(sqlglot.exp.Table)) if tree else None


def with_table_match(rows: list[dict]) -> list[dict]:
    """Each scored row with `tables_match`: the prediction reads exactly the gold query's tables."""
    for row in rows:
        if not row.get("skipped"):
            predicted = query_tables(row.get("prediction") or "")
            row["tables_match"] = predicted is not None and predicted == query_tables(row["gold"])
    return rows


MEASURES = ("execution_match", "valid_sql", "tables_match")


def paired_between(first: list[dict], second: list[dict]) -> dict:
    """Two runs on the same questions, for each measure: right in the second only, in the first only, and p."""
    pairs = [(a, b) for a, b in zip(first, second) if not a.get("skipped")]
    result = {}
    for measure in MEASURES:
        gained = sum(1 for a, b in pairs if b.get(measure) and not a.get(measure))
        lost = sum(1 for a, b in pairs if a.get(measure) and not b.get(measure))
        result[measure] = {"second_only": gained, "first_only": lost, "p": exact_mcnemar(gained, lost)}
    return result


def paired_gains(eval_dir: Path, spider: Path) -> dict:
    """Base against adapter on the same Spider dev questions: gained, lost, the exact McNemar p, and how
    many gains have a gold result that is empty or a count of 0, which any query of the right shape on
    that database matches (in a small model's gains, most of them)."""
    from starsql.evaluate.spider import Database, database_path

    def read(label: str) -> list[dict]:
        return read_per_example(eval_dir / label)

    def trivial(row: dict) -> bool:  # the gold query run as the harness runs it: read-only, time-limited
        database = Database.open_read_only(database_path(spider, row["db_id"]))
        try:
            rows = database.run(row["gold"]).rows
        finally:
            database.connection.close()
        return not rows or rows == [(0,)]

    base, adapter = read("base"), read("adapter")
    gained = [a for a, b in zip(adapter, base) if a.get("execution_match") and not b.get("execution_match")]
    lost = sum(1 for a, b in zip(adapter, base) if b.get("execution_match") and not a.get("execution_match"))
    return {"gained": len(gained), "lost": lost, "mcnemar_p": exact_mcnemar(len(gained), lost),
            "gained_with_empty_or_zero_gold": sum(map(trivial, gained))}  # fmt: skip


# Smoke: one log, evaluation and checkpoint; TRL tokenizes and packs only the rows 4 steps need, a dozen rows
# are held out for the eval loss (2,048-token rows cost a CPU most in attention), answers stop at 32 tokens.
SMOKE_SFT = ["--max_steps", "4", "--eval_steps", "4", "--save_steps", "4", "--logging_steps", "4", "--max_train_rows", "64",
             "--eval_fraction", "0.003", "--eval_max_new_tokens", "32"]
SFT_FORMATS = ("sql-create-context", "mixture", "spider")


def recipe_config(out: Path, schema_format: str, rows: Path, tables: Path) -> Path:
    """The recommended config (RECIPE) with its data pointed at the local rows: minimal schemas, whole ones, or
    the recipe's own mixture of the two (its weights and distractor count, both sources the same questions)."""
    config = yaml.safe_load(RECIPE.read_text())
    mixture = config.pop("datasets")
    minimal = {"path": str(rows), "format": "sql-create-context"}
    whole = {"path": str(rows), "format": "spider", "columns": {"sql": "answer"}, "spider_tables": str(tables)}
    if schema_format == "mixture":
        config["datasets"] = [{**source, **local} for source, local in zip(mixture, (minimal, whole))]
    else:
        local = minimal if schema_format == "sql-create-context" else whole
        config |= {"dataset_name": local["path"], "dataset_format": local["format"]}
        config |= {"sql_column": "answer", "spider_tables": str(tables)} if schema_format == "spider" else {}
    path = out / f"recipe-{schema_format}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tokens_trained(run_dir: Path) -> int | None:
    """TRL's count of the tokens trained on, from the last checkpoint's log (the same budget for every recipe)."""
    states = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    history = json.loads(states[-1].read_text())["log_history"] if states else []
    counts = [entry["num_tokens"] for entry in history if "num_tokens" in entry]
    return int(counts[-1]) if counts else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "proof")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes and few steps: checks the wiring on a CPU.")
    parser.add_argument("--pretrain_steps", type=int, default=3000)
    parser.add_argument("--pretrain_batch_size", type=int, help="512-token rows per pretraining step (default 32; 4 with --smoke).")
    parser.add_argument("--renamed_copies", type=int, default=96, help="Renamed copies of each training database.")
    parser.add_argument("--hidden_size", type=int, default=512, help="Base model width (heads of 64); 768 is ~85M parameters.")
    parser.add_argument("--num_layers", type=int, default=8, help="Base model depth.")
    parser.add_argument("--made_up_fraction", type=float, default=0.0,
                        help="Share of renamed copies that use made-up words instead of real identifiers.")
    parser.add_argument("--sft_formats", default="sql-create-context,mixture",
                        help="Recipes, each fine-tuned from the same base for the same steps: sql-create-context (the "
                             "old one: each answer's own tables), mixture (the new one: distractor tables, and whole "
                             "schemas with keys) and spider (whole schemas only); each is compared with the first.")
    parser.add_argument("--learning_rate", default="2e-4", help="Fine-tuning learning rate; the recipe's is 2e-4.")
    parser.add_argument("--heldout", type=int, default=300,
                        help="sql-create-context rows held out of pretraining and fine-tuning, scored schema-only.")
    parser.add_argument("--eval_4bit", action="store_true", help="Also score each adapter on the 4-bit base it was trained on.")
    args = parser.parse_args()
    formats = args.sft_formats.split(",")
    if set(formats) - set(SFT_FORMATS):
        parser.error(f"--sft_formats: {', '.join(sorted(set(formats) - set(SFT_FORMATS)))}; use {', '.join(SFT_FORMATS)}.")
    spider = args.shared / "spider_dev"
    started = time.time()
    # The smoke run checks the wiring, not the model: 10 steps of 4 rows (the real run's 32-row steps were
    # most of its CPU time).
    steps = 10 if args.smoke else args.pretrain_steps
    pretrain_batch_size = args.pretrain_batch_size or (4 if args.smoke else 32)
    limit = ["--eval_limit", "12"] if args.smoke else []

    init = build_base(args.shared, args.out / "init", args.smoke, args.hidden_size, args.num_layers)
    sft_rows, heldout_file, heldout = split_heldout(args.shared, args.out, 12 if args.smoke else args.heldout)
    corpus = pretraining_corpus(args.shared, args.out / "pretrain_corpus.jsonl", 2 if args.smoke else args.renamed_copies,
                                made_up_fraction=args.made_up_fraction, heldout=heldout, every=8 if args.smoke else 1)
    pretrained = args.out / "base" / "pretrain_done.json"  # written last: a base without it is unfinished
    if pretrained.is_file():
        print(f"Reusing the pretrained base in {args.out / 'base'}")
    code = 0 if pretrained.is_file() else train_sft.main([
        "--model_name_or_path", str(init), "--use_peft", "false", "--load_in_4bit", "false", "--dtype", "float32",
        "--dataset_name", str(corpus), "--dataset_format", "raw-sql", "--text_column", "content",
        # Pretraining packs the classic way: rows cut at 512 tokens, plain causal attention.
        "--packing_strategy", "wrapped",
        "--output_dir", str(args.out / "base"), "--max_steps", str(steps), "--learning_rate", "1e-3",
        "--warmup_steps", str(steps // 20), "--per_device_train_batch_size", str(pretrain_batch_size), "--gradient_accumulation_steps", "1",
        "--gradient_checkpointing", "false", "--eval_fraction", "0.02", "--eval_steps", str(steps if args.smoke else max(steps // 5, 1)),
        "--save_steps", str(steps), "--logging_steps", str(max(steps // 50, 1)), "--weight_decay", "0.1",
        "--license", "cc-by-sa-4.0", "--auto_resume", "false",
    ])
    assert code == 0, "pretraining failed"
    if not pretrained.is_file():
        pretrained.write_text(json.dumps({"pretrain_steps": steps, "pretrain_wall_s": round(time.time() - started)}))
    results = {**json.loads(pretrained.read_text()), "heldout_rows": len(heldout), "runs": {}}

    for schema_format in formats:
        out = args.out / f"sft-{schema_format}"
        t0 = time.time()
        finished = (out / "eval_results.json").is_file()  # a recipe finished by an earlier call of this command
        if finished:
            print(f"Reusing the finished recipe in {out}")
        code = 0 if finished else train_sft.main([
            "--config", str(recipe_config(args.out, schema_format, sft_rows, spider / "tables.json")),
            "--model_name_or_path", str(args.out / "base"), "--contamination_eval", str(spider / "dev.json"),
            "--spider_dev", str(spider), "--output_dir", str(out), "--learning_rate", args.learning_rate,
            "--eval_spider", str(spider), "--eval_generation_batch_size", "64", "--license", "cc-by-sa-4.0",
            "--gradient_checkpointing", "false", *(SMOKE_SFT if args.smoke else []),  # resumes its own checkpoint
            *limit,
        ])
        assert code == 0, f"fine-tuning ({schema_format}) failed"
        reports = json.loads((out / "eval_results.json").read_text())
        if args.eval_4bit:  # the adapter on the 4-bit base it was trained on (the app's small-card mode)
            from starsql.evaluate.cli import evaluate_model

            reports["adapter_on_4bit_base"] = evaluate_model(
                str(args.out / "base"), str(out), spider_dir=spider, out_dir=out / "eval_spider_4bit", batch_size=64,
                load_in_4bit=True, limit=12 if args.smoke else None,
            )["adapter"]
        if heldout:  # new questions on the training databases, prompted with full schemas as Spider dev is
            from starsql.evaluate.cli import evaluate_model

            held = evaluate_model(str(args.out / "base"), str(out), schema_only=heldout_file, out_dir=out / "eval_heldout",
                                  batch_size=64, compare=True, max_new_tokens=32 if args.smoke else 256)  # smoke: wiring only
            reports.update({f"heldout_{label}": report for label, report in held.items()})
        data = json.loads((out / "run_summary.json").read_text())["data"]
        summary = {"wall_s": None if finished else round(time.time() - t0), "tokens_trained": tokens_trained(out),
                   "paired": paired_gains(out / "eval_spider", spider), "data": data}
        for label, report in reports.items():
            summary[label] = {m: report.get(m) for m in ("execution_accuracy", "exact_match", "valid_sql_rate", "label", "scored")}
            if "keep_distinct" in report:  # executed: which DISTINCT rule the accuracy used (evaluate's default: removed)
                summary[label]["keep_distinct"] = report["keep_distinct"]
            summary[label]["by_hardness"] = {h: v["execution_accuracy"] for h, v in (report.get("by_hardness") or {}).items()}
        for label in ("base", "adapter"):
            rows = [r for r in with_table_match(read_per_example(out / "eval_spider" / label)) if not r.get("skipped")]
            summary[label]["tables_match_rate"] = sum(r["tables_match"] for r in rows) / len(rows)
        results["runs"][schema_format] = summary
    # The recipes against the first, question by question (Spider dev, the adapters).
    first = with_table_match(read_per_example(args.out / f"sft-{formats[0]}" / "eval_spider" / "adapter"))
    results["recipes"] = {
        f"{name} vs {formats[0]}": paired_between(first, with_table_match(
            read_per_example(args.out / f"sft-{name}" / "eval_spider" / "adapter")))
        for name in formats[1:]
    }
    results["total_wall_s"] = round(time.time() - started)
    (args.out / "proof.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
