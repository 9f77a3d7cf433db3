"""The benchmark scripts' CPU smoke modes: their wiring keeps working between GPU sessions."""

import json
import random
import subprocess
import sys

from conftest import ROOT


def test_learning_proof_smoke_runs_end_to_end(tmp_path, shared_dir, tiny_cache):
    out = tmp_path / "proof"
    done = subprocess.run([sys.executable, "bench/learning_proof.py", "--shared", str(shared_dir), "--out", str(out), "--smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    proof = json.loads((out / "proof.json").read_text())
    assert set(proof["runs"]) == {"sql-create-context", "mixture"}  # the old recipe and the new, from one base
    assert proof["heldout_rows"] == 12
    for run in proof["runs"].values():
        assert {"base", "adapter", "heldout_base", "heldout_adapter"} <= set(run)
        assert run["adapter"]["label"] == "EX on 12/12" and run["adapter"]["keep_distinct"] is False
        assert run["heldout_adapter"]["scored"] == 12 and run["heldout_adapter"]["execution_accuracy"] is None
        assert {"gained", "lost", "mcnemar_p", "gained_with_empty_or_zero_gold"} <= set(run["paired"])
        assert 0 <= run["adapter"]["tables_match_rate"] <= 1 and run["tokens_trained"] > 0
        assert run["data"]["prompt_lengths"]["Spider dev (whole schemas)"]["rows"] == 1034
    old, new = proof["runs"]["sql-create-context"]["data"], proof["runs"]["mixture"]["data"]
    assert "sources" not in old and old["distractors_added"] == 0  # minimal schemas
    minimal, whole = new["sources"]  # distractors on sql-create-context's schemas, and whole Spider schemas
    assert minimal["distractors_added"] > 0 and (whole["format"], whole["mixture_rows"] > 0) == ("spider", True)
    # The recipes, question by question on Spider dev: right answers, valid SQL, the gold query's tables.
    compared = proof["recipes"]["mixture vs sql-create-context"]
    assert set(compared) == {"execution_match", "valid_sql", "tables_match"}
    assert all(0 <= c["p"] <= 1 and c["first_only"] + c["second_only"] <= 12 for c in compared.values())
    # The same command again (a run cut by a time limit is taken up this way) reuses the base and both
    # recipes: nothing trains again, and the scores are the same.
    again = subprocess.run([sys.executable, "bench/learning_proof.py", "--shared", str(shared_dir), "--out", str(out), "--smoke"],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Reusing the pretrained base" in again.stdout and again.stdout.count("Reusing the finished recipe") == 2
    reused = json.loads((out / "proof.json").read_text())
    assert reused["pretrain_wall_s"] == proof["pretrain_wall_s"] and reused["recipes"] == proof["recipes"]
    assert all(reused["runs"][name]["adapter"] == run["adapter"] for name, run in proof["runs"].items())
    # Held-out rows stay out of fine-tuning and pretraining, SQL and questions alike.
    heldout = [json.loads(line) for line in (out / "heldout_full_schema.jsonl").read_text().splitlines()]
    trained = json.loads((out / "sft_train.json").read_text())
    corpus = (out / "pretrain_corpus.jsonl").read_text()
    assert not {h["question"] for h in heldout} & {t["question"] for t in trained}
    assert not {h["answer"] for h in heldout} & {t["answer"] for t in trained}
    assert not any(json.dumps(h["question"])[1:-1] in corpus for h in heldout)
    sys.path.insert(0, str(ROOT / "bench"))
    import sqlglot
    from learning_proof import sql_key

    corpus_sql = {sql_key(sqlglot.parse_one(line, read="sqlite")) for doc in corpus.splitlines()
                  for line in json.loads(doc)["content"].splitlines() if line.startswith("SELECT")}
    assert not corpus_sql & {sql_key(sqlglot.parse_one(h["answer"], read="sqlite")) for h in heldout}


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


def test_heldout_split_drops_paraphrases_and_keeps_the_rest(tmp_path, shared_dir):
    sys.path.insert(0, str(ROOT / "bench"))
    from learning_proof import split_heldout, sql_key

    import sqlglot

    rows = json.loads((shared_dir / "sql_create_context_spider" / "train.json").read_text())
    train_file, heldout_file, heldout = split_heldout(shared_dir, tmp_path, 300)
    train = json.loads(train_file.read_text())
    key = lambda row: sql_key(sqlglot.parse_one(row["answer"], read="sqlite"))  # noqa: E731
    held = {key(r) for r in heldout}
    assert len(heldout) == 300 and not held & {key(r) for r in train}
    assert len(train) < len(rows) - 300  # paraphrases (same SQL) of held-out rows left too (5 with seed 0)
    assert len(train) == sum(key(r) not in held for r in rows)  # and nothing else did
    assert all(line.startswith('{"question"') and "CREATE TABLE" in line for line in heldout_file.read_text().splitlines())


def test_generate_speed_smoke_runs_the_app_configs(tmp_path, tiny_cache):
    out = tmp_path / "generate.jsonl"
    done = subprocess.run([sys.executable, "bench/generate_speed.py", "--smoke", "--repeats", "1", "--identity_prompts", "2",
                           "--model_dir", str(tmp_path / "model"), "--only", "bf16-merged-graph,bf16-merged-graph-app-default,bf16-merged-graph-512-cublas,bf16-merged-graph-512-eager-prefill,app-concurrent16,fp32-identity,fp32-batched-identity,aoti",
                           "--aoti_tokens", "512", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {r["config"]: r for r in map(json.loads, out.read_text().splitlines())}
    graph, concurrent = lines["bf16-merged-graph"], lines["app-concurrent16"]
    assert not any("error" in r for r in lines.values()), lines
    # The app's cache lengths, the shortest that holds 300 + 64 tokens; tokens as plain generate's.
    assert graph["cache_lengths"][0] == 512 and graph["cache_length_used"] == 512
    assert graph["identical_to_bf16_merged"] and graph["identity_prompts_identical"] == 2
    assert graph["fused_qkv_layers"] == 2  # prepared as the fast backend prepares it: q/k/v fused in every layer
    app_default = lines["bf16-merged-graph-app-default"]  # room for 256 new tokens: the 1,024 cache, same tokens
    assert app_default["cache_length_used"] == 1024 and app_default["identical_to_bf16_merged"]
    # Through the app's backend; without CUDA graphs it answers two at once (the decoder and generate()).
    assert concurrent["batch"] == 16 and concurrent["app_concurrency"] == 2 and concurrent["tokens_per_s"] > 0
    assert lines["fp32-identity"]["identity_prompts_identical"] == 2
    # The batched decoder, its steps over 332 positions, then the whole slot: plain generate's tokens; both prompts at
    # once, prefilled whole; then the shorter (the longer one's start) and the longer from past it; both again, kept.
    batched = lines["fp32-batched-identity"]
    assert batched["identity_prompts_identical"] == batched["one_by_one_identical"] == batched["kept_together_identical"] == 2
    assert batched["whole_reused_share"] == 0 and 0.3 < batched["one_by_one_reused_share"] < 0.5
    assert batched["kept_together_reused_share"] > 0.99
    # The decoder with cuBLAS for one-token linears (the gemv kernel's baseline; on a CPU both are F.linear),
    # and with the prompt's forward eager at its own width: the same tokens.
    assert lines["bf16-merged-graph-512-cublas"]["identical_to_bf16_merged"]
    assert lines["bf16-merged-graph-512-eager-prefill"]["identical_to_bf16_merged"]
    # DECODE_AOTI's decoder: compiled once, then loaded from its package as a restart does; generate()'s tokens.
    aoti = lines["aoti"]
    assert aoti["identical_to_bf16_merged"] and aoti["identity_prompts_identical"] == 2 and aoti["restart_s"] < aoti["build_s"]


def test_batched_step_smoke_times_every_step_prefill_and_engine(tmp_path):
    """bench/batched_step.py on a CPU: each (rows, length) step timed, prefills together, alone and from past a
    restored prefix, and the five engines (whole slots or lengths, step by step or queued ahead, prefixes kept or
    not) serving the same users every token; prompts sharing their first tokens, which only `prefixes` reuses."""
    out = tmp_path / "batched_step.json"
    done = subprocess.run([sys.executable, "bench/batched_step.py", "--smoke", "--parts", "steps,prefill,prefill_profile,engine", "--out", str(out),
                           "--shared_tokens", "12"], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {(s["rows"], s["length"]) for s in result["steps"]} == {(r, n) for r in (1, 2, 4, 8, 16) for n in (256, 512, 1024, 2048)}
    assert all(s["gpu_ms"] > 0 and s["host_ms"] > 0 for s in result["steps"])
    assert [p["prompts"] for p in result["prefill"]] == [1, 2, 4, 8, 16] and result["prefill"][0]["together_ms"] is None
    assert all(p["rest_ms"] > 0 for p in result["prefill"])
    profile = result["prefill_profile"]  # 4 prompts' last 12 tokens: the smallest graph that holds them
    assert profile["graph"] == [4, 32, 256] and profile["kernel_us_per_prefill"] > 0 and profile["top"]
    engines = {e["engine"]: e for e in result["engine"]}
    assert set(engines) == {"whole-slots", "lengths", "queue-ahead", "both", "prefixes"}
    assert all(e["tokens"] == 16 * 8 and e["ms_a_step"] > 0 and e["prefills"] >= 1 for e in engines.values())
    assert engines["prefixes"]["reused_share"] >= 0.5 and all(e["reused_share"] == 0 for n, e in engines.items() if n != "prefixes")
    rejected = subprocess.run([sys.executable, "bench/batched_step.py", "--smoke", "--engines", "both,fastest"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert rejected.returncode == 2 and "no engine fastest" in rejected.stderr


def test_paired_gains_count_changes_and_gains_a_zero_result_would_give(tmp_path, spider_dir):
    sys.path.insert(0, str(ROOT / "bench"))
    from learning_proof import paired_gains

    def row(gold, match):
        return {"db_id": "concert_singer", "gold": gold, "execution_match": match}

    rows = {  # (base, adapter) per question
        "SELECT count(*) FROM singer": (False, True),  # a real gain
        "SELECT count(*) FROM singer WHERE age > 1000": (False, True),  # gold counts 0: any count of 0 matches
        "SELECT name FROM singer WHERE age > 1000": (False, True),  # gold is empty
        "SELECT name FROM singer": (True, False),  # lost
        "SELECT name FROM stadium": (True, True),  # right both times: no change
    }
    for index, label in enumerate(("base", "adapter")):
        (tmp_path / label).mkdir()
        lines = [json.dumps(row(gold, pair[index])) for gold, pair in rows.items()]
        (tmp_path / label / "per_example.jsonl").write_text("\n".join(lines + [json.dumps({"db_id": "wta_1", "skipped": True})]))
    paired = paired_gains(tmp_path, spider_dir)
    assert (paired["gained"], paired["lost"], paired["gained_with_empty_or_zero_gold"]) == (3, 1, 2)
    assert paired["mcnemar_p"] == 2 * (1 + 4) / 16  # exact two-sided binomial, 4 changes, 1 the other way


def test_train_throughput_smoke_checks_losses_and_applies_overrides(tmp_path, tiny_cache):
    out = tmp_path / "train.jsonl"
    done = subprocess.run([sys.executable, "bench/train_throughput.py", "--smoke", "--model_dir", str(tmp_path / "model"),
                           "--only", "sft-mb16-attndrop0", "--add", "fp32-weights:dtype=float32,half_ln=0,model.attention_dropout=0,loss_ref=sft-mb16-attndrop0,step1=1",
                           "--add", "no-lora-dropout:margs.lora_dropout=0,model.attention_dropout=0,loss_ref=sft-mb16-attndrop0,step1=1,step1_ref=fp32-weights",
                           "--add", "peft-lora:fused_lora=false,model.attention_dropout=0,loss_ref=sft-mb16-attndrop0",
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {r["config"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert all(lines[name]["tokens_per_s"] > 0 for name in ("plain-ckpt", "sft-mb16-attndrop0", "fp32-weights", "no-lora-dropout"))
    # CPU: fp32 either way, so the same rows give the same losses; a changed recipe gets no loss check.
    assert lines["fp32-weights"]["dtype"] == "float32" and not lines["fp32-weights"]["half_precision_layer_norm"]
    assert lines["fp32-weights"]["loss_equivalent"] is True
    assert lines["no-lora-dropout"]["overrides"]["margs.lora_dropout"] == 0 and "loss_equivalent" not in lines["no-lora-dropout"]
    assert lines["no-lora-dropout"]["losses"] != lines["sft-mb16-attndrop0"]["losses"]  # the override reached the model
    # The trainer path fuses its LoRA layers (starsql.train.fused_lora); PEFT's own forward gives the same losses, bitwise.
    assert lines["sft-mb16-attndrop0"]["fused_lora"] is True and lines["peft-lora"]["fused_lora"] is False
    assert lines["peft-lora"]["losses_exact"] == lines["sft-mb16-attndrop0"]["losses_exact"]
    assert lines["peft-lora"]["losses_exact"] != lines["peft-lora"]["losses"]  # not rounded
    # The first optimizer step, compared (how the compiled step-2 loss was traced): LoRA's B starts at zero,
    # so A gets no gradient at step 1, and AdamW's first step moves every B weight by about the learning rate.
    step1 = lines["no-lora-dropout"]["step1_vs_ref"]
    assert step1["lora_A"]["grad_nonzero"] == [0, 0] and step1["lora_B"]["grad_nonzero"][0] == step1["lora_B"]["entries"]
    assert all(abs(mean - 1) < 0.05 for mean in step1["lora_B"]["update_mean_abs_over_lr"])
    assert step1["lora_B"]["grad_rel_l2_diff"] > 0  # LoRA dropout on (the reference) and off: other gradients


def test_step1_comparison_counts_flipped_signs_and_the_updates_they_change(tmp_path):
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import step1_comparison

    grads = {"l.lora_A.w": torch.zeros(4), "l.lora_B.w": torch.tensor([1.0, -2.0, 1e-6, 3.0])}
    flipped = dict(grads, **{"l.lora_B.w": torch.tensor([1.0, -2.0, -1e-6, 0.0])})
    for name, g in (("ref", grads), ("cand", flipped)):
        torch.save({"grads": g, "updates": {n: -1e-3 * t.sign() for n, t in g.items()}, "lr": 1e-3}, tmp_path / f"{name}.pt")
    report = step1_comparison(str(tmp_path / "ref.pt"), str(tmp_path / "cand.pt"))
    b = report["lora_B"]
    assert b["grad_sign_flipped"] == 1 and b["grad_zero_in_one_only"] == 1 and b["grad_nonzero"] == [4, 3]
    assert b["update_differs_by_half_lr"] == 2  # the flipped entry moved the other way; the zeroed one did not move
    assert b["flipped_abs_grad_over_median"] < 1e-5  # the flipped entry was tiny next to the others
    assert report["lora_A"]["grad_rel_l2_diff"] == 0



def test_gpu_idle_adds_up_the_gaps_and_names_what_the_cpu_was_doing():
    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import gpu_idle

    def kernel(ts, dur, corr):
        return {"ph": "X", "cat": "kernel", "name": f"k{corr}", "ts": ts, "dur": dur, "args": {"correlation": corr}}

    def launch(ts, corr, tid=1):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 2, "tid": tid,
                "args": {"correlation": corr}}

    def op(name, ts, dur, tid=1):
        return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}

    # Kernels at 0-100, 150-250 (a 50 us gap while the CPU ran aten::item inside a step), 260-300 (10 us: below
    # the threshold) and 400-500, launched at 50, before its 100 us gap began: it waited on something else.
    trace = {"traceEvents": [
        kernel(0, 100, 1), kernel(150, 100, 2), kernel(260, 40, 3), kernel(400, 100, 4),
        launch(0, 1), launch(140, 2), launch(200, 3), launch(50, 4),
        op("Optimizer.step", 90, 60), op("aten::item", 95, 40), op("aten::mm", 300, 10),
    ]}  # fmt: skip
    idle = gpu_idle(trace, steps=1)
    assert idle["window_ms_per_step"] == 0.5 and idle["idle_ms_per_step"] == 0.16
    assert idle["launched_early_ms_per_step"] == 0.1
    assert idle["gaps"] == [{"cause": "Optimizer.step > aten::item", "ms_per_step": 0.05, "gaps_per_step": 1.0}]
    assert idle["largest"] == [{"us": 50, "thread": 1, "stack": ["Optimizer.step", "aten::item"], "before": "k1", "after": "k2"}]
    assert gpu_idle({"traceEvents": []}, steps=1) == {}


def test_recipe_time_times_every_step_of_a_train_sft_run(tmp_path, tiny_cache):
    out = tmp_path / "recipe.jsonl"
    done = subprocess.run([sys.executable, "bench/recipe_time.py", "--model_dir", "tiny-starcoder2", "--config", "configs/tiny.yaml",
                           "--data", "data/sql_create_context_sample.jsonl", "--out", str(out),
                           "--variant", "short:--max_steps,4,--eval_steps,4,--save_steps,4,--logging_steps,1",
                           "--profile_steps", "3-4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = map(json.loads, out.read_text().splitlines())
    assert record["variant"] == "short" and record["exit_code"] == 0 and "error" not in record, record
    assert record["steps"] == 4 and record["tokens"] > 0 and record["steady_tokens_per_s"] > 0
    assert len(record["first_two_steps_s"]) == 2 and record["train_wall_s"] >= record["steady_steps_s"]
    # Steady: the steps after the first logged one (TRL's token counts), here 2-4.
    assert (record["steady_from_step"], record["steady_to_step"]) == (2, 4)
    assert record["gpu_idle"] == {}  # profiled, and no GPU kernels on a CPU


def test_recipes_are_compared_question_by_question_on_the_tables_they_read():
    sys.path.insert(0, str(ROOT / "bench"))
    from learning_proof import paired_between, query_tables, with_table_match

    assert query_tables("SELECT T1.name FROM Singer AS T1 JOIN concert ON 1 WHERE x IN (SELECT y FROM stadium)") == \
        {"singer", "concert", "stadium"}
    assert query_tables("SELECT FROM WHERE (") is None
    gold = "SELECT name FROM singer"
    first = with_table_match([{"gold": gold, "prediction": p, "execution_match": e, "valid_sql": True}
                              for p, e in [("SELECT age FROM singer", False), ("SELECT 1 FROM singer JOIN concert", False),
                                           ("SELECT name FROM singer", True), ("nonsense (", False)]] + [{"skipped": True}])
    second = with_table_match([{"gold": gold, "prediction": "SELECT name FROM SINGER", "execution_match": True,
                                "valid_sql": True}] * 4 + [{"skipped": True}])
    assert [r.get("tables_match") for r in first] == [True, False, True, False, None]
    compared = paired_between(first, second)
    assert compared["tables_match"] == {"second_only": 2, "first_only": 0, "p": 0.5}
    assert compared["execution_match"] == {"second_only": 3, "first_only": 0, "p": 0.25}
    assert compared["valid_sql"] == {"second_only": 0, "first_only": 0, "p": 1.0}


def test_serve_load_smoke_drives_the_app_over_http(tmp_path):
    """bench/serve_load.py end to end on a CPU: the app started, users connected first, tokens counted by /usage."""
    out = tmp_path / "serve_load.json"
    done = subprocess.run([sys.executable, "bench/serve_load.py", "--smoke", "--users", "1,3", "--rounds", "1",
                           "--app", "batched=DECODE_BATCH=4", "--start_only", "none", "--out", str(out),
                           "--model_dir", str(tmp_path / "model")],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (record,) = json.loads(out.read_text())["apps"]
    assert "error" not in record, record
    # Each user count through gradio_client, then through plain HTTP as the browser calls it.
    assert [(load["client"], load["users"], load["requests"]) for load in record["loads"]] == [
        ("gradio_client", 1, 1), ("gradio_client", 3, 3), ("http", 1, 1), ("http", 3, 3)]
    for load in record["loads"]:
        # The random model never ends its statement: every answer runs to its 64 tokens, and /usage saw them all.
        assert load["tokens"] == 64 * load["requests"] and load["tokens_per_s"] > 0
        assert len(load["each_request"]) == load["requests"] and load["ttft_p50_s"] <= load["latency_p50_s"]
        assert load["updates_per_request"] >= 1  # the streamed reply was read as it came
    assert record["plain_http_ttft"]["p50_s"] > 0


def test_serve_load_reads_the_engines_work_during_a_load_from_usage():
    sys.path.insert(0, str(ROOT / "bench"))
    from serve_load import engine_use

    assert engine_use({"tokens": 0}, {"tokens": 64}, 1.0) is None  # plain generate(): no engine
    before = {"decoder": {"steps": 10, "rows": 10, "step_s": 0.04, "prefills": 1, "prefilled": 1, "prefill_s": 0.01,
                          "prompt_tokens": 300, "reused_tokens": 0}, "first_token": {"count": 1, "recent_s": [0.5]}}
    after = {"decoder": {"steps": 74, "rows": 1034, "step_s": 0.36, "prefills": 3, "prefilled": 17, "prefill_s": 0.11,
                         "prompt_tokens": 5100, "reused_tokens": 4320},
             "first_token": {"count": 5, "recent_s": [0.5, 0.004, 0.002, 0.003, 0.001]}}
    assert engine_use(before, after, 2.0) == {"steps": 64, "requests_per_step": 16.0, "step_ms": 5.0, "prefills": 2,
                                             "requests_per_prefill": 8.0, "prefill_ms": 50.0, "reused_share": 0.9,
                                             "busy_share": 0.21, "first_token_p50_ms": 2.0, "first_token_p95_ms": 4.0,
                                             "first_piece_p50_ms": None, "first_piece_p95_ms": None}
    # With WORKERS the model's process also times each request from its arrival; the window is the load's own,
    # even once older waits have dropped out of the recent ones.
    before["first_piece"] = {"count": 1000, "recent_s": [0.9] * 4}
    after["first_piece"] = {"count": 1003, "recent_s": [0.9, 0.010, 0.030, 0.020]}
    use = engine_use(before, after, 2.0)
    assert (use["first_piece_p50_ms"], use["first_piece_p95_ms"]) == (20.0, 30.0)


def test_app_ceiling_drives_the_app_with_an_engine_that_takes_no_time(tmp_path):
    """bench/app_ceiling.py end to end: the app in process, a stand-in engine, users over plain HTTP."""
    out = tmp_path / "ceiling.json"
    done = subprocess.run([sys.executable, "bench/app_ceiling.py", "--users", "2", "--rounds", "2", "--new_tokens", "16",
                           "--step_ms", "1", "--out", str(out), "--model_dir", str(tmp_path / "model")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (load,) = json.loads(out.read_text())["loads"]
    assert load["users"] == 2 and load["requests"] == 4 and load["answers_per_s"] > 0
    # The stand-in never sends EOS; an answer stops early only where its random text ends a statement.
    assert 0 < load["tokens"] <= 16 * 4 and load["app_cpu_ms_per_request"] > 0 and load["updates_per_request"] >= 1


def test_the_serving_benchmarks_random_model_writes_only_text_a_user_sees(tmp_path):
    """bench/common.visible_tokens_only: without it the random model writes ids that decode to nothing (or half a
    character), and a client's time to the first text would be the model's, not the server's."""
    sys.path.insert(0, str(ROOT / "bench"))
    from common import ensure_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = {}
    for visible in (False, True):
        path = ensure_model(tmp_path / f"visible-{visible}", smoke=True, visible=visible)
        model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        ids = tokenizer("CREATE TABLE singer (name VARCHAR, age INTEGER);\n-- How many singers?\nSELECT", return_tensors="pt")["input_ids"]
        new = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[-1]:].tolist()
        texts[visible] = [tokenizer.decode([token], skip_special_tokens=True) for token in new]
    assert len(texts[True]) == 24 and all(t.strip() and "\ufffd" not in t and ";" not in t and "-" not in t for t in texts[True])
    assert not all(t.strip() and "\ufffd" not in t for t in texts[False])  # the plain random model's are not
