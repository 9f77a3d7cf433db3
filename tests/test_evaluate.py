"""The evaluation harness: execution-match semantics, Spider gold, bad input, model mode end to end."""

import json
import os
import sqlite3
import time
from collections import Counter

import pytest

from starsql.evaluate import cli, metrics, report, score, spider
from starsql.evaluate.cli import main
from starsql.evaluate.metrics import execution_match, normalize_sql, order_matters, remove_distinct
from starsql.evaluate.score import score_predictions, score_schema_only
from starsql.evaluate.spider import (
    CorruptDatabaseError,
    Database,
    MissingDatabaseError,
    PredictionCountError,
    database_path,
    load_spider,
)


@pytest.fixture
def database(tmp_path):
    """A small read-only database: duplicates, NULLs and floats on purpose."""
    path = tmp_path / "toy.sqlite"
    connection = sqlite3.connect(path)
    connection.executescript(
        """
        CREATE TABLE pet (id INTEGER, name TEXT, kind TEXT, weight REAL, owner TEXT);
        INSERT INTO pet VALUES (1, 'Rex', 'dog', 12.5, 'Ann'), (2, 'Tom', 'cat', 4.1, NULL),
                               (3, 'Fido', 'dog', 20.0, 'Bob'), (4, 'Kitty', 'cat', 3.3, 'Ann');
        """
    )
    connection.commit()
    connection.close()
    return Database.open_read_only(path)


def matches(database, gold, predicted, timeout=10.0, keep_distinct=False):
    return execution_match(database, gold, predicted, timeout=timeout, keep_distinct=keep_distinct)[0]


def test_row_order_counts_only_when_gold_orders(database):
    assert matches(database, "SELECT name FROM pet", "SELECT name FROM pet ORDER BY name DESC")
    assert not matches(database, "SELECT name FROM pet ORDER BY weight", "SELECT name FROM pet ORDER BY weight DESC")
    assert matches(database, "SELECT name FROM pet ORDER BY weight", "SELECT name FROM pet ORDER BY weight ASC")
    # ORDER BY in a subquery does not make the outer result ordered.
    assert not order_matters("SELECT name FROM pet WHERE weight = (SELECT weight FROM pet ORDER BY weight LIMIT 1)")
    assert order_matters("SELECT kind FROM pet UNION SELECT owner FROM pet ORDER BY 1")


def test_rows_are_bags_duplicates_count(database):
    assert not matches(database, "SELECT kind FROM pet", "SELECT DISTINCT kind FROM pet", keep_distinct=True)
    assert not matches(database, "SELECT kind FROM pet", "SELECT kind FROM pet UNION ALL SELECT 'dog'")
    assert matches(database, "SELECT kind FROM pet", "SELECT kind FROM pet ORDER BY id DESC")
    assert not matches(database, "SELECT kind FROM pet WHERE id < 4", "SELECT kind FROM pet WHERE id > 1")  # same set, other bag


def test_distinct_is_removed_from_both_queries_unless_kept(database):
    # Only DISTINCT differs: gold gives dog, cat; the prediction dog, cat, dog, cat. The test-suite
    # evaluator's default drops DISTINCT from both before running them: right; with keep_distinct: wrong.
    assert matches(database, "SELECT DISTINCT kind FROM pet", "SELECT kind FROM pet")
    assert not matches(database, "SELECT DISTINCT kind FROM pet", "SELECT kind FROM pet", keep_distinct=True)
    assert matches(database, "SELECT kind FROM pet", "SELECT DISTINCT kind FROM pet")  # the other way round too
    # Every DISTINCT keyword goes, as in the official evaluator: inside aggregates and subqueries too.
    assert matches(database, "SELECT count(DISTINCT kind) FROM pet", "SELECT count(kind) FROM pet")
    assert not matches(database, "SELECT count(DISTINCT kind) FROM pet", "SELECT count(kind) FROM pet", keep_distinct=True)
    assert matches(database, "SELECT count(*) FROM (SELECT DISTINCT kind FROM pet)", "SELECT 4")
    # Only the keyword: strings, quoted names and IS [NOT] DISTINCT FROM (a comparison) stay as written.
    kept = """SELECT 'distinct', "distinct" FROM t WHERE a IS NOT DISTINCT FROM b"""
    assert remove_distinct(kept) == kept
    assert remove_distinct("select Distinct(kind) from pet").split() == ["select", "(kind)", "from", "pet"]
    assert remove_distinct("SELECT 'unterminated") == "SELECT 'unterminated"  # cannot tokenize: unchanged


def test_report_and_table_say_which_distinct_rule_was_used():
    # The model card gets report.markdown_table: a reader must see which rule the accuracy used.
    results = [{"index": 0, "db_id": "x", "hardness": "easy", "execution_match": True, "exact_match": False, "valid_sql": True}]
    for keep, rule in ((False, "DISTINCT removed"), (True, "DISTINCT kept")):
        summary = score.summarize(results, keep)
        assert summary["keep_distinct"] is keep and summary["distinct"].startswith(rule)
        assert f"Execution match: {rule}" in report.markdown_table({"base": summary, "adapter": summary})
    unexecuted = [{k: v for k, v in results[0].items() if k != "execution_match"}]  # schema-only: nothing ran
    assert "keep_distinct" not in score.summarize(unexecuted) and "Execution match" not in report.markdown_table(
        {"base": score.summarize(unexecuted)})


def test_columns_may_come_in_any_order(database):
    assert matches(database, "SELECT name, kind FROM pet", "SELECT kind, name FROM pet")
    assert matches(database, "SELECT name, kind FROM pet ORDER BY id", "SELECT kind, name FROM pet ORDER BY id")
    assert not matches(database, "SELECT name, kind FROM pet", "SELECT name, owner FROM pet")
    assert not matches(database, "SELECT name, kind FROM pet", "SELECT name FROM pet")
    # Columns holding the same values as bags, paired differently in the rows.
    assert not matches(database, "SELECT 1, 2 UNION ALL SELECT 2, 1", "SELECT 1, 1 UNION ALL SELECT 2, 2")
    assert matches(database, "SELECT name FROM pet WHERE id > 9", "SELECT name, kind FROM pet WHERE id > 9")  # both empty


def test_nulls_and_floats(database):
    assert matches(database, "SELECT owner FROM pet", "SELECT owner FROM pet")
    assert not matches(database, "SELECT owner FROM pet", "SELECT coalesce(owner, '') FROM pet")
    assert matches(database, "SELECT avg(weight) FROM pet", "SELECT sum(weight) / count(weight) FROM pet")
    assert matches(database, "SELECT 0.3", "SELECT 0.1 + 0.2")
    assert matches(database, "SELECT 2", "SELECT 2.0")
    assert not matches(database, "SELECT 1.0", "SELECT 1.001")


def test_errors_and_writes_are_wrong(database):
    matched, error = execution_match(database, "SELECT name FROM pet", "SELECT nme FROM pet")
    assert not matched and "no such column" in error
    assert not execution_match(database, "SELECT name FROM pet", "")[0]
    assert not execution_match(database, "SELECT name FROM pet", "DELETE FROM pet")[0]
    assert database.run("SELECT count(*) FROM pet").rows == [(4,)]  # nothing was deleted


def test_runaway_query_is_interrupted(database):
    runaway = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
    started = time.monotonic()
    matched, error = execution_match(database, "SELECT count(*) FROM pet", runaway, timeout=1.0)
    assert not matched and "timed out" in error
    assert time.monotonic() - started < 5
    cross = "SELECT count(*) FROM pet a, pet b, pet c, pet d, pet e, pet f, pet g, pet h, pet i, pet j, pet k, pet l, pet m, pet n"
    assert "timed out" in execution_match(database, "SELECT 1", cross, timeout=0.5)[1]
    assert database.run("SELECT count(*) FROM pet").rows == [(4,)]  # the connection still works


def test_exact_match_normalisation():
    columns = {"name", "country", "singer_id"}
    gold = 'SELECT T1.Name FROM singer AS T1 JOIN concert AS T2 ON T1.singer_id = T2.singer_id WHERE T1.country = "France"'
    predicted = "select s.name from Singer s inner join concert c on s.singer_id=c.singer_id where s.country='France';"
    assert normalize_sql(gold, columns) == normalize_sql(predicted, columns)
    assert normalize_sql("SELECT name FROM singer ORDER BY name ASC") == normalize_sql("SELECT singer.name FROM singer ORDER BY name")
    assert normalize_sql("SELECT name FROM singer", columns) != normalize_sql("SELECT country FROM singer", columns)
    assert normalize_sql("SELEC name  FRM x") == normalize_sql("selec NAME frm x;")  # unparseable: text compare


def test_schema_only_scoring():
    rows = [
        {"question": "q1", "context": "CREATE TABLE head (name VARCHAR, age INTEGER)", "answer": "SELECT name FROM head WHERE age > 56"},
        {"question": "q2", "context": "CREATE TABLE head (name VARCHAR, age INTEGER)", "answer": 'SELECT count(*) FROM head WHERE name = "Bo"'},
        {"question": "q3", "context": "CREATE TABLE head (name VARCHAR, age INTEGER)", "answer": "SELECT age FROM head"},
    ]
    predictions = ["select NAME from head where age>56", "SELECT COUNT(*) FROM head WHERE name = 'Bo'", "SELECT height FROM head"]
    report = score_schema_only(predictions, rows, progress=False)
    assert report["exact_match"] == pytest.approx(2 / 3)
    assert report["valid_sql_rate"] == pytest.approx(2 / 3)
    assert report["execution_accuracy"] is None and report["scored"] == 3


# ------------------------------------------------------------------ real Spider dev


def gold_predictions(spider_dir) -> list[str]:
    return [line.split("\t")[0] for line in (spider_dir / "dev_gold.sql").read_text().splitlines()]


def test_gold_scores_one_on_spider_dev(spider_dir):
    report = score_predictions(gold_predictions(spider_dir), spider_dir, progress=False)
    assert (report["scored"], report["skipped"], report["total"]) == (972, 62, 1034)
    assert report["execution_accuracy"] == 1.0
    assert report["exact_match"] == 1.0 and report["valid_sql_rate"] == 1.0
    assert report["label"] == "EX on 972/1,034 (no wta_1)"
    assert sum(level["count"] for level in report["by_hardness"].values()) == 972


def test_hardness_matches_spiders_published_counts(spider_dir):
    examples = load_spider(spider_dir)
    assert Counter(e.hardness for e in examples) == {"easy": 248, "medium": 446, "hard": 174, "extra": 166}


def test_known_wrong_predictions_score_exactly(spider_dir):
    examples = load_spider(spider_dir)
    predictions = gold_predictions(spider_dir)
    replaced = [e for e in examples if e.db_id != "wta_1"][:10]
    differ = 0
    for example in replaced:
        predictions[example.index] = "SELECT 1"
        with sqlite3.connect(database_path(spider_dir, example.db_id)) as connection:
            differ += connection.execute(example.gold).fetchall() != [(1,)]
    report = score_predictions(predictions, spider_dir, progress=False)
    assert differ > 0
    assert report["execution_accuracy"] == (972 - differ) / 972
    assert report["exact_match"] == (972 - 10) / 972


def test_wrong_line_count_is_a_clear_error(spider_dir, tmp_path, capsys):
    predictions = tmp_path / "preds.sql"
    predictions.write_text("\n".join(gold_predictions(spider_dir)[:-1]) + "\n")
    assert main(["--predictions", str(predictions), "--spider", str(spider_dir), "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "has 1033 lines, expected 1034" in message and "Traceback" not in message


def fake_spider(spider_dir, tmp_path):
    """A Spider folder with the real json files but an empty database/ folder."""
    fake = tmp_path / "spider"
    (fake / "database").mkdir(parents=True)
    for name in ("dev.json", "tables.json", "dev_gold.sql"):
        (fake / name).symlink_to(spider_dir / name)
    return fake


def test_missing_database_is_a_clear_error(spider_dir, tmp_path):
    fake = fake_spider(spider_dir, tmp_path)
    with pytest.raises(MissingDatabaseError, match=r"concert_singer.*wta_1"):
        score_predictions(["SELECT 1"] * 5, fake, limit=5, progress=False)
    report = score_predictions(["SELECT 1"] * 5, fake, limit=5, skip_missing=True, progress=False)
    assert (report["scored"], report["skipped"]) == (0, 5)


def test_corrupt_database_is_a_clear_error(spider_dir, tmp_path, capsys):
    fake = fake_spider(spider_dir, tmp_path)
    broken = fake / "database" / "concert_singer" / "concert_singer.sqlite"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(CorruptDatabaseError, match="concert_singer.sqlite"):
        score_predictions(["SELECT 1"] * 5, fake, limit=5, progress=False)
    predictions = tmp_path / "preds.sql"
    predictions.write_text("SELECT 1\n" * 5)
    assert main(["--predictions", str(predictions), "--spider", str(fake), "--limit", "5", "--out", str(tmp_path / "o")]) == 2
    assert "concert_singer.sqlite" in capsys.readouterr().err


def test_prediction_count_error_from_python(spider_dir):
    with pytest.raises(PredictionCountError, match="Got 1 predictions, expected 3"):
        score_predictions(["SELECT 1"], spider_dir, limit=3, progress=False)
    with pytest.raises(PredictionCountError, match="expected 1034.*limit=N"):
        score_predictions(["SELECT 1"], spider_dir, progress=False)


def test_nothing_cached_outlives_a_scoring_call(spider_dir, tmp_path):
    # Spider dev's first question: "How many singers do we have?" (SELECT count(*) FROM singer).
    fake = fake_spider(spider_dir, tmp_path)
    path = fake / "database" / "concert_singer" / "concert_singer.sqlite"
    path.parent.mkdir()

    def write(target, singers: int):
        connection = sqlite3.connect(target)
        connection.execute("CREATE TABLE singer (singer_id INTEGER, name TEXT)")
        connection.executemany("INSERT INTO singer VALUES (?, ?)", [(i, f"s{i}") for i in range(singers)])
        connection.commit()
        connection.close()

    write(path, 2)
    assert score_predictions(["SELECT 2"], fake, limit=1, progress=False)["execution_accuracy"] == 1.0
    before = path.stat()
    write(tmp_path / "new.sqlite", 3)
    os.replace(tmp_path / "new.sqlite", path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size  # same path, size and time: only the contents changed
    assert score_predictions(["SELECT 2"], fake, limit=1, progress=False)["execution_accuracy"] == 0.0

    checked = score.check_databases(fake, load_spider(fake, limit=1))["concert_singer"]
    assert "closed" in checked.run("SELECT 1").error  # no cache passed in: the call closed what it opened
    for module in (spider, metrics, score, report, cli):
        for name, value in vars(module).items():
            assert not hasattr(value, "cache_info"), f"{module.__name__}.{name} is a module-level cache"
            assert name.startswith("__") or not isinstance(value, (dict, list, set)), f"{module.__name__}.{name}"


# ------------------------------------------------------------------ model mode, tiny model


def test_model_mode_end_to_end(spider_dir, tiny_run, tmp_path):
    out = tmp_path / "eval"
    args = ["--model", "tiny-starcoder2", "--adapter", str(tiny_run), "--spider", str(spider_dir),
            "--limit", "5", "--max_new_tokens", "16", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert len((out / "preds.sql").read_text().splitlines()) == 5
    report = json.loads((out / "report.json").read_text())
    assert report["total"] == 5 and report["adapter"] == str(tiny_run)
    assert (out / "accuracy_by_hardness.png").stat().st_size > 0
    assert "execution accuracy" in (out / "report.md").read_text()


def test_compare_reports_base_and_adapter(spider_dir, tiny_run, tmp_path):
    out = tmp_path / "compare"
    args = ["--model", "tiny-starcoder2", "--adapter", str(tiny_run), "--compare", "--spider", str(spider_dir),
            "--limit", "5", "--max_new_tokens", "16", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    reports = json.loads((out / "report.json").read_text())
    assert set(reports) == {"base", "adapter"}
    for label in ("base", "adapter"):
        assert len((out / label / "preds.sql").read_text().splitlines()) == 5
        assert json.loads((out / label / "report.json").read_text())["total"] == 5
    assert "| metric | base | adapter |" in (out / "report.md").read_text()
    assert (out / "accuracy_by_hardness.png").is_file()


def test_cli_scores_gold_file_and_schema_only_file(spider_dir, tmp_path, capsys):
    # dev_gold.sql itself (`SQL<TAB>db_id` lines) is accepted as a predictions file.
    out = tmp_path / "gold"
    assert main(["--predictions", str(spider_dir / "dev_gold.sql"), "--spider", str(spider_dir), "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["execution_accuracy"] == 1.0
    assert "EX on 972/1,034 (no wta_1)" in capsys.readouterr().out

    assert json.loads((out / "report.json").read_text())["keep_distinct"] is False

    rows = tmp_path / "heldout.jsonl"
    rows.write_text(json.dumps({"question": "q", "context": "CREATE TABLE t (a INTEGER)", "answer": "SELECT a FROM t"}) + "\n")
    predictions = tmp_path / "preds.sql"
    predictions.write_text("SELECT A FROM T\n")
    assert main(["--predictions", str(predictions), "--schema_only", str(rows), "--out", str(tmp_path / "s")]) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["exact_match"] == 1.0 and report["valid_sql_rate"] == 1.0
    assert "keep_distinct" not in report  # nothing executed: no DISTINCT rule to state


def test_cli_removes_distinct_by_default_and_keep_distinct_keeps_it(spider_dir, tmp_path):
    # Dev questions 8 and 9 (SELECT DISTINCT country FROM singer WHERE age > 20): 3 countries, 6 without DISTINCT.
    gold = gold_predictions(spider_dir)[:10]
    predictions = tmp_path / "preds.sql"
    predictions.write_text("".join(sql.replace("DISTINCT ", "") + "\n" for sql in gold))
    assert sum("DISTINCT" in sql for sql in gold) == 2
    for flags, right, rule in (([], 10, "DISTINCT removed"), (["--keep_distinct"], 8, "DISTINCT kept")):
        out = tmp_path / f"out{len(flags)}"
        assert main(["--predictions", str(predictions), "--spider", str(spider_dir), "--limit", "10", "--out", str(out), *flags]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["execution_accuracy"] * 10 == pytest.approx(right) and report["keep_distinct"] == bool(flags)
        assert f"Execution match: {rule}" in (out / "report.md").read_text()  # the table the model card gets


def test_schema_only_model_mode(tiny_model_path, tmp_path):
    from starsql.evaluate.cli import evaluate_model
    from starsql.tiny import DATA

    reports = evaluate_model("tiny-starcoder2", schema_only=DATA, out_dir=tmp_path, limit=3, max_new_tokens=8)
    assert reports["base"]["total"] == 3
    assert len((tmp_path / "preds.sql").read_text().splitlines()) == 3
