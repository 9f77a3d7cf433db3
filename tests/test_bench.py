"""The benchmark scripts' CPU smoke modes: their wiring keeps working between GPU sessions."""

import json
import random
import subprocess
import sys

from conftest import ROOT, SHARED


def test_learning_proof_smoke_runs_end_to_end(tmp_path, spider_dir, tiny_cache):
    out = tmp_path / "proof"
    done = subprocess.run([sys.executable, "bench/learning_proof.py", "--shared", str(SHARED), "--out", str(out), "--smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    proof = json.loads((out / "proof.json").read_text())
    assert set(proof["runs"]) == {"sql-create-context", "spider"}
    for run in proof["runs"].values():
        assert {"base", "adapter"} <= set(run)
        assert run["adapter"]["label"] == "EX on 12/12"


def test_renamed_copies_rename_schema_queries_and_question_alike():
    import sqlglot

    sys.path.insert(0, str(ROOT / "bench"))
    from learning_proof import rename_database

    table = {"db_id": "x", "table_names_original": ["singer"], "column_names_original": [[-1, "*"], [0, "name"], [0, "age"]],
             "column_types": ["text", "text", "number"]}
    items = [("What are the names of singers older than 30?", sqlglot.parse_one("SELECT name FROM singer WHERE age > 30"))]
    for fraction in (0.0, 1.0):
        renamed, [(question, sql)] = rename_database(table, items, ["vehicle", "colour", "weight", "owner"], random.Random(0), fraction)
        new = dict(zip(["singer", "name", "age"], [renamed["table_names_original"][0], *(c for _, c in renamed["column_names_original"][1:])]))
        assert "singer" not in sql and new["singer"] in sql and new["name"] in sql and new["age"] in sql
        spelled = {old: name.replace("_", " ") for old, name in new.items()}  # born_state is "born state" in words
        assert f"{spelled['singer']}s" in question and f"{spelled['name']}s" in question  # plural kept
