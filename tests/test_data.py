import json
import re

import pytest
from transformers import AutoTokenizer

from starsql.train.data import DataArguments, prepare_datasets, strip_sql_comments
from starsql.prompt import build_prompt, format_completion

from conftest import ROOT

SAMPLE = ROOT / "data" / "sql_create_context_sample.jsonl"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sql_create_context_rows_become_prompt_completion_pairs(tokenizer):
    train, eval_, report = prepare_datasets(DataArguments(dataset_name=str(SAMPLE), eval_fraction=0.1), tokenizer, 512)
    first = json.loads(SAMPLE.read_text().splitlines()[0])
    rows = train.to_list() + eval_.to_list()
    assert {"prompt": build_prompt(first["context"], first["question"]), "completion": format_completion(first["answer"])} in rows
    assert (report.loaded, report.train_rows, report.eval_rows) == (400, 360, 40)


def test_bad_rows_are_dropped_and_counted(tmp_path, tokenizer):
    good = {"question": "How many?", "context": "CREATE TABLE t (x INT)", "answer": "SELECT count(*) FROM t"}
    rows = [
        good,
        dict(good),  # exact duplicate
        {**good, "question": ""},
        {**good, "answer": None},
        {**good, "question": 42},
        {**good, "question": "long " * 400},
        {**good, "question": "How many rows are there?"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, eval_, report = prepare_datasets(DataArguments(dataset_name=str(path), eval_fraction=0), tokenizer, 256)
    assert eval_ is None and report.train_rows == 2
    assert dict(report.dropped) == {"duplicate": 1, "empty field": 2, "not a string": 1, "over 256 tokens": 1}
    assert "dropped: duplicate" in report.summary()


def test_wrong_column_name_says_which_columns_exist(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "context": "CREATE TABLE t (x INT)", "answer": "SELECT 1"}])
    with pytest.raises(ValueError, match=r"\['question'\] not found.*Available columns: \['answer', 'context', 'q'\].*--question_column"):
        prepare_datasets(DataArguments(dataset_name=str(path)), tokenizer, 512)


def test_empty_dataset_and_missing_file_are_clear(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="has no rows"):
        prepare_datasets(DataArguments(dataset_name=str(empty)), tokenizer, 512)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        prepare_datasets(DataArguments(dataset_name=str(tmp_path / "nope.jsonl")), tokenizer, 512)
    with pytest.raises(ValueError, match="Unknown dataset_format"):
        prepare_datasets(DataArguments(dataset_name=str(SAMPLE), dataset_format="csv-ish"), tokenizer, 512)


def test_csv_and_parquet_with_column_mapping(tmp_path, tokenizer):
    import pandas as pd

    frame = pd.DataFrame({"q": ["How many a?", "How many b?"], "ddl": ["CREATE TABLE a (x INT)"] * 2, "gold": ["SELECT count(*) FROM a"] * 2})
    for path in (tmp_path / "d.csv", tmp_path / "d.parquet"):
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
        args = DataArguments(dataset_name=str(path), question_column="q", schema_column="ddl", sql_column="gold", eval_fraction=0)
        train, _, _ = prepare_datasets(args, tokenizer, 512)
        assert train[0]["prompt"] == build_prompt("CREATE TABLE a (x INT)", "How many a?")


def test_spider_format_renders_schema_from_tables_json(spider_dir, tokenizer):
    args = DataArguments(dataset_name=str(spider_dir / "dev.json"), dataset_format="spider",
                         spider_tables=str(spider_dir / "tables.json"), eval_fraction=0)
    train, _, report = prepare_datasets(args, tokenizer, 2048)
    assert report.loaded == 1034
    first = train[0]
    assert first["prompt"].startswith("-- Database schema\nCREATE TABLE stadium (Stadium_ID INTEGER PRIMARY KEY,")
    # Every table of the database, with its keys, rendered by starsql.schema (as evaluation and the app render it).
    assert table_names(first["prompt"]) == ["stadium", "singer", "concert", "singer_in_concert"]
    assert "FOREIGN KEY (Stadium_ID) REFERENCES stadium(Stadium_ID)" in first["prompt"]
    assert first["completion"] == "SELECT count(*) FROM singer;"
    with pytest.raises(ValueError, match="--spider_tables"):
        prepare_datasets(DataArguments(dataset_name=str(spider_dir / "dev.json"), dataset_format="spider"), tokenizer, 512)


def test_contamination_filter_drops_shared_questions_and_databases(tmp_path, tokenizer):
    rows = [
        {"question": "How many singers do we have?", "context": "CREATE TABLE s (x INT)", "answer": "SELECT 1", "db_id": "other"},
        {"question": "Count the heads", "context": "CREATE TABLE h (x INT)", "answer": "SELECT 2", "db_id": "concert_singer"},
        {"question": "Count the heads", "context": "CREATE TABLE h (x INT)", "answer": "SELECT 3", "db_id": "clean_db"},
    ]
    evalset = tmp_path / "dev.json"
    evalset.write_text(json.dumps([{"question": "How many  singers do we have ?", "db_id": "concert_singer"}]))
    args = DataArguments(dataset_name=str(write_jsonl(tmp_path / "d.jsonl", rows)), contamination_eval=str(evalset), eval_fraction=0)
    train, _, report = prepare_datasets(args, tokenizer, 512)
    assert report.dropped["contaminated"] == 2 and train["completion"] == ["SELECT 3;"]


def test_shipped_training_rows_share_nothing_with_spider_dev(spider_dir, tokenizer):
    args = DataArguments(dataset_name=str(SAMPLE), contamination_eval=str(spider_dir / "dev.json"), eval_fraction=0)
    _, _, report = prepare_datasets(args, tokenizer, 512)
    assert report.dropped.get("contaminated", 0) == 0


def test_raw_sql_strips_comments_keeps_literals(tmp_path, tokenizer):
    assert strip_sql_comments("SELECT '--not' /* gone */ FROM t -- gone\n") == "SELECT '--not'  FROM t \n"
    path = write_jsonl(tmp_path / "raw.jsonl", [{"content": "-- header\nCREATE TABLE t (x INT);\n\n\n\nSELECT x FROM t;   "}])
    train, _, _ = prepare_datasets(DataArguments(dataset_name=str(path), dataset_format="raw-sql", eval_fraction=0), tokenizer, 512)
    assert train["text"] == ["CREATE TABLE t (x INT);\n\nSELECT x FROM t;"]


def table_names(prompt: str) -> list[str]:
    from starsql.train.data import table_name

    schema = prompt.split("\n\n-- Question:")[0].removeprefix("-- Database schema\n")
    return [table_name(line) for line in schema.splitlines()]


def test_distractor_tables_come_from_the_same_database_first_deterministic_and_never_contradicting(tmp_path, tokenizer):
    # Database `shop` has three tables over its rows; `hr` has an `Orders` table too (another case, another
    # database: it must never join a schema that already has shop's `orders`); a row without db_id gets any table.
    rows = [{"question": f"q{i}", "context": ctx, "answer": f"SELECT {i} FROM t", "db_id": db}
            for i, (ctx, db) in enumerate([
                ("CREATE TABLE customers (id INT, name VARCHAR)", "shop"),
                ("CREATE TABLE orders (id INT, customer_id INT)", "shop"),
                ("CREATE TABLE products (id INT, price INT); CREATE TABLE orders (id INT)", "shop"),
                ("CREATE TABLE \"Orders\" (x INT)", "hr"),
                ("CREATE TABLE staff (x INT)", "hr"),
                ("CREATE TABLE table_name_1 (x INT)", None),
            ] * 20)]  # fmt: skip
    for row in rows:
        row["question"] += f" {rows.index(row)}"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    args = DataArguments(dataset_name=str(path), eval_fraction=0, schema_distractors=2)
    first, _, report = prepare_datasets(args, tokenizer, 512)
    again, _, _ = prepare_datasets(args, tokenizer, 512)
    other_seed, _, _ = prepare_datasets(DataArguments(**{**args.__dict__, "distractor_seed": 1}), tokenizer, 512)
    assert first["prompt"] == again["prompt"] and first["prompt"] != other_seed["prompt"]
    added = 0
    for row, prompt in zip(rows, first["prompt"]):
        names = table_names(prompt)
        own = [n.lower() for n in re.findall(r'TABLE "?(\w+)', row["context"])]
        assert len(names) == len(set(names)) and set(own) <= set(names)  # never a second table of one name
        extra = [n for n in names if n not in own]
        added += len(extra)
        shop = {"customers", "orders", "products"}
        if row["db_id"] == "shop" and set(extra) - shop:  # another database's table only once shop's are all in
            assert shop <= set(names)
    assert report.distractors_added == added and 0 < report.rows_with_distractors < len(rows)
    assert f"distractor tables    {added:>8,}" in report.summary()
    shuffled = [p for p, r in zip(first["prompt"], rows) if table_names(p)[0] != re.findall(r'TABLE "?(\w+)', r["context"])[0].lower()]
    assert shuffled  # the row's own tables are shuffled in, not always first
    with pytest.raises(ValueError, match="sql-create-context rows only"):
        prepare_datasets(DataArguments(dataset_name=str(path), dataset_format="spider", spider_tables="x", schema_distractors=2), tokenizer, 512)


def write_tables_json(path):
    """A two-database Spider tables.json: keys included."""
    path.write_text(json.dumps([
        {"db_id": "zoo", "table_names_original": ["animal", "keeper"],
         "column_names_original": [[-1, "*"], [0, "animal_id"], [0, "keeper_id"], [1, "keeper_id"], [1, "name"]],
         "column_types": ["text", "number", "number", "number", "text"], "primary_keys": [1, 3], "foreign_keys": [[2, 3]]},
        {"db_id": "farm", "table_names_original": ["field"], "column_names_original": [[-1, "*"], [0, "size"]],
         "column_types": ["text", "number"], "primary_keys": [], "foreign_keys": []},
    ]))  # fmt: skip
    return path


def test_a_two_source_mixture_interleaves_by_weight_and_filters_contamination_in_each(tmp_path, tokenizer):
    import zipfile

    from starsql.train.data import mixture_sources

    create_context = write_jsonl(tmp_path / "scc.jsonl", [
        {"question": f"How many cows are there in pen {i}?", "context": "CREATE TABLE cow (pen INT)", "answer": f"SELECT count(*) FROM cow WHERE pen = {i}"}
        for i in range(40)] + [{"question": "How many animals do we have?", "context": "CREATE TABLE a (x INT)", "answer": "SELECT 1"}])  # fmt: skip
    spider = write_jsonl(tmp_path / "spider.jsonl", [
        {"q": f"Which animals does keeper {i} keep?", "gold": f"SELECT animal_id FROM animal WHERE keeper_id = {i}", "db_id": "zoo"}
        for i in range(10)] + [{"q": "How big is the field?", "gold": "SELECT size FROM field", "db_id": "farm"}])  # fmt: skip
    with zipfile.ZipFile(tmp_path / "spider.zip", "w") as archive:  # tables.json read inside a zip, as from the Hub
        archive.write(write_tables_json(tmp_path / "tables.json"), "spider/tables.json")
    evalset = tmp_path / "dev.json"
    evalset.write_text(json.dumps([{"question": "How many animals do we have", "db_id": "farm"}]))
    mixture = [
        {"path": str(create_context), "format": "sql-create-context", "weight": 3, "schema_distractors": 1},
        {"path": str(spider), "format": "spider", "split": "train", "weight": 1, "columns": {"question": "q", "sql": "gold"},
         "spider_tables": f"zip://spider/tables.json::file://{tmp_path / 'spider.zip'}"},
    ]
    args = DataArguments(datasets=mixture, contamination_eval=str(evalset), eval_fraction=0.1)
    train, eval_, report = prepare_datasets(args, tokenizer, 512)
    scc, spi = report.sources
    assert (scc.dropped["contaminated"], spi.dropped["contaminated"]) == (1, 1)  # a question; a database
    assert (scc.train_rows, scc.eval_rows, spi.train_rows, spi.eval_rows) == (36, 4, 9, 1)
    assert scc.distractors_added > 0 and spi.distractors_added == 0
    # all_exhausted: every row of both sources, the smaller one repeated to keep its share (3:1 on average).
    assert scc.mixture_rows + spi.mixture_rows == report.train_rows == len(train) and scc.mixture_rows >= 36
    assert set(train["prompt"]) >= set(p for p in train["prompt"] if "keeper" in p) and 6 <= spi.mixture_rows <= 20
    zoo = next(p for p in train["prompt"] if "keeper" in p)  # the whole database, keys included
    assert "CREATE TABLE animal (animal_id INTEGER PRIMARY KEY, keeper_id INTEGER, FOREIGN KEY (keeper_id) REFERENCES keeper(keeper_id));" in zoo
    assert "CREATE TABLE keeper (keeper_id INTEGER PRIMARY KEY, name VARCHAR);" in zoo
    assert len(eval_) == 5 and report.eval_rows == 5
    again, _, _ = prepare_datasets(args, tokenizer, 512)
    assert again["prompt"] == train["prompt"]  # seeded (mixture_seed)
    summary = report.summary()
    assert "a mixture of 2 sources" in summary and f"in the mixture       {spi.mixture_rows:>8,} (weight 1)" in summary
    assert report.as_dict()["sources"][1]["mixture_rows"] == spi.mixture_rows
    # A file on the command line replaces a config's mixture (benchmarks point the recipes at local rows).
    assert [s.dataset_name for s, _ in mixture_sources(DataArguments(datasets=mixture, dataset_name="f.jsonl"))] == ["f.jsonl"]
    for bad, message in [([{"path": "x", "weigth": 1}], r"unknown key\(s\) \['weigth'\]"),
                         ([{"path": "x", "weight": 0}], "weight must be a positive number"),
                         ([{"format": "spider"}], "with a `path`"),
                         ([{"path": "x", "format": "spider-ish"}], "Unknown dataset_format"),
                         ([{"path": "x"}, {"path": "y", "format": "raw-sql"}], "cannot mix raw-sql")]:
        with pytest.raises(ValueError, match=message):
            mixture_sources(DataArguments(datasets=bad))


def test_the_summary_gives_prompt_lengths_of_training_spider_dev_and_the_app_examples(spider_dir, tokenizer):
    args = DataArguments(dataset_name=str(SAMPLE), eval_fraction=0, spider_dev=str(spider_dir))
    _, _, report = prepare_datasets(args, tokenizer, 512)
    lengths = report.lengths
    assert set(lengths) == {"train: sql_create_context_sample.jsonl (sql-create-context)", "Spider dev (whole schemas)", "app examples"}
    assert lengths["train: sql_create_context_sample.jsonl (sql-create-context)"]["rows"] == 400 and lengths["Spider dev (whole schemas)"]["rows"] == 1034
    assert lengths["app examples"]["rows"] >= 3
    for p in lengths.values():
        assert 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["max"]
    assert lengths["Spider dev (whole schemas)"]["p50"] > lengths["train: sql_create_context_sample.jsonl (sql-create-context)"]["p50"]  # whole schemas are longer
    assert "Spider dev (whole schemas)" in report.summary() and "p99" in report.summary()
    assert report.as_dict()["prompt_lengths"] == lengths


@pytest.mark.parametrize("recipe", ["starcoder2-3b-sql.yaml", "starcoder2-3b-sql-fast.yaml"])
def test_the_recommended_recipes_train_on_the_mixture(recipe):
    # Parsed as train_sft.py parses them, resolved to their sources without downloading anything.
    from trl import TrlParser

    from starsql.train.data import mixture_sources
    from starsql.train.model import ModelArguments
    from starsql.train.sft import RunArguments, TrainingConfig

    parser = TrlParser((RunArguments, TrainingConfig, ModelArguments, DataArguments))
    _, training, _, data = parser.parse_args_and_config(["--config", str(ROOT / "configs" / recipe)])
    (scc, scc_weight), (spider, spider_weight) = mixture_sources(data)
    assert (scc.dataset_name, scc.dataset_format, scc.schema_distractors) == ("b-mc2/sql-create-context", "sql-create-context", 6)
    assert (spider.dataset_name, spider.dataset_format, spider.dataset_train_split) == ("xlangai/spider", "spider", "train")
    assert spider.columns() == {"question": "question", "sql": "query", "db_id": "db_id"}  # xlangai/spider's columns
    assert spider.spider_tables.startswith("zip://spider/tables.json::hf://datasets/xlangai/spider@")
    assert scc_weight == 4 * spider_weight and spider.schema_distractors == 0
    # Whole schemas need room: 2,048-token rows, the same 2,048 tokens an optimizer step per GPU as before.
    assert training.max_length == 2048
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps * training.max_length in (2048, 8192)
