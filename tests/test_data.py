import json

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
    assert first["prompt"].startswith("-- Database schema\nCREATE TABLE stadium (Stadium_ID INTEGER")
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
