from starsql.prompt import PROMPT_TEMPLATE, build_prompt, extract_sql, format_completion
from starsql.schema import load_spider_schemas, normalize_schema, split_statements


def test_prompt_is_the_template_with_one_statement_per_line():
    prompt = build_prompt("CREATE TABLE a (x INTEGER); CREATE TABLE b (y VARCHAR)", "How many\n a rows?")
    assert prompt == (
        "-- Database schema\nCREATE TABLE a (x INTEGER);\nCREATE TABLE b (y VARCHAR);\n\n"
        "-- Question: How many a rows?\n-- SQL:\n"
    )
    assert prompt == PROMPT_TEMPLATE.format(schema=normalize_schema("CREATE TABLE a (x INTEGER);CREATE TABLE b (y VARCHAR)"), history="", question="How many a rows?")


def test_history_turns_come_before_the_question():
    prompt = build_prompt("CREATE TABLE t (year INTEGER)", "now only 2023", [("all rows", "SELECT * FROM t")])
    assert prompt.endswith("-- Question: all rows\n-- SQL:\nSELECT * FROM t;\n\n-- Question: now only 2023\n-- SQL:\n")


def test_completion_is_one_statement_with_semicolon():
    assert format_completion("SELECT  count(*)\nFROM t ;") == "SELECT count(*) FROM t;"


def test_extract_sql_stops_at_first_statement_and_keeps_literals():
    assert extract_sql(" SELECT a FROM t WHERE b = 'x;y'; SELECT 2;") == "SELECT a FROM t WHERE b = 'x;y'"
    assert extract_sql("SELECT a FROM t\n-- Question: next one\n-- SQL:\nSELECT 1") == "SELECT a FROM t"
    assert extract_sql("```sql\nSELECT 1\n```\nsome text") == "SELECT 1"
    assert extract_sql("") == ""


def test_split_statements_respects_string_literals():
    assert split_statements("INSERT INTO t VALUES ('a;b'); CREATE TABLE u (x INT)") == [
        "INSERT INTO t VALUES ('a;b')",
        "CREATE TABLE u (x INT)",
    ]


def test_spider_schema_renders_every_table(spider_dir):
    schemas = load_spider_schemas(spider_dir / "tables.json")
    concert = schemas["concert_singer"].splitlines()
    assert len(concert) == 4 and concert[1].startswith("CREATE TABLE singer (Singer_ID INTEGER PRIMARY KEY, Name VARCHAR")
    assert concert[2].endswith("FOREIGN KEY (Stadium_ID) REFERENCES stadium(Stadium_ID));")
    assert '"Home Town" VARCHAR' in schemas["perpetrator"]
    assert "sqlite_sequence" not in schemas["world_1"]  # SQLite's own table is no part of the schema


def test_rendered_schema_reads_back_the_same_from_sqlite():
    import sqlite3

    from starsql.schema import Column, ForeignKey, Table, render_schema, sqlite_tables

    tables = [Table("artist", [Column("id", "INTEGER"), Column("From", "TEXT")], ["id"]),
              Table("song", [Column("artist_id", "INTEGER"), Column("title", "VARCHAR(20)"), Column("Home Town", "TEXT")],
                    ["artist_id", "title"], [ForeignKey(["artist_id"], "artist", ["id"])])]
    text = render_schema(tables)
    assert text.splitlines()[0] == 'CREATE TABLE artist (id INTEGER PRIMARY KEY, "From" TEXT);'  # a keyword is quoted
    conn = sqlite3.connect(":memory:")
    conn.executescript(text)
    assert sqlite_tables(conn) == tables


def test_history_fits_its_token_budget_newest_first():
    from starsql.prompt import fit_history

    history = [(f"question {i}", f"SELECT {i}") for i in range(10)]
    words = lambda text: len(text.split())  # noqa: E731 -- a stand-in tokenizer
    kept, dropped = fit_history(history, words, max_tokens=20)
    assert kept == history[-2:] and dropped == 8  # 8 words a turn: the newest two fit in 20
    assert fit_history([("q" * 10_000, "SELECT 1")], lambda text: 1 / 0, max_tokens=10) == ([], 1)  # not even tokenized
    assert fit_history(None, words, 20) == ([], 0)


def test_extract_sql_takes_a_nul():
    assert extract_sql("SELECT 'a\x00b'; SELECT 2") == "SELECT 'a\x00b'"
