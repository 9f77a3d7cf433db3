"""The tiny recipe end to end: trains, writes adapter + curves + card, resumes after SIGTERM."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ROOT

TINY = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--dataset_name", str(ROOT / "data" / "sql_create_context_sample.jsonl")]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_tiny_recipe_learns_and_writes_everything(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md", "training_curves.png"} <= names
    summary = json.loads((tiny_run / "run_summary.json").read_text())
    history = json.loads((tiny_run / "checkpoint-40" / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < losses[0] - 0.1, losses
    assert summary["global_step"] == 40 and summary["data"]["train_rows"] == 360
    assert (tiny_run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_front_matter_parses_and_names_the_real_hyperparameters(tiny_run):
    card = (tiny_run / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "tiny-starcoder2" and meta["library_name"] == "peft"
    assert "text-to-sql" in meta["tags"] and meta["pipeline_tag"] == "text-generation" and meta["license"]
    assert "| `learning_rate` | `0.005` |" in card and "| `max_steps` | `40` |" in card
    assert "| `lora_target_modules` | `['q_proj', 'k_proj', 'v_proj', 'o_proj', 'c_fc', 'c_proj']` |" in card
    assert "-- Question: {question}" in card and "gradio_client" in card and "![training_curves](training_curves.png)" in card
    assert "400 rows loaded" in card and "Security" in card
    assert "| `sync_free_step` | `True` |" in card and "| `fused_lora` | `True` |" in card


def one_thread(**extra) -> dict:
    """This process's environment for a training subprocess, with one CPU thread: the suite runs two test files at
    a time on two cores, and torch's threads beyond the cores spin-wait (about twice the CPU time, no sooner done)."""
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def run_tiny(out, *extra, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "train_sft.py"), *TINY, "--output_dir", str(out), *extra],
                            cwd=ROOT, env=env or one_thread(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


FAKE_TOKEN = "hf_FakeTokenNeverOnDisk0123456789"
# What every CPU run printed, each with a cause now fixed or a known harmless source silenced (sft, cli).
NOISE = ("gemm_4bit_forward", "FutureWarning", "pin_memory", "non_blocking", "Repo card metadata block")


def files_holding(folder, secret: str) -> list[str]:
    """Every file under `folder` whose bytes hold `secret` (pickles included)."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def losses_after(output_dir, step: int) -> list[tuple[int, float, float | None]]:
    history = json.loads((output_dir / "checkpoint-30" / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], e.get("loss"), e.get("eval_loss")) for e in history if e["step"] > step and ("loss" in e or "eval_loss" in e)]


def last_token_count(checkpoint) -> int:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [e["num_tokens"] for e in history if "num_tokens" in e][-1]


def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes_to_the_same_loss(tmp_path, tiny_model_path):
    # The resumed run's losses are the uninterrupted run's, to the bit. Also: the interrupted folder's README says the
    # run is unfinished and how to resume; TRL's token count goes on from the checkpoint; a --hub_token is in no
    # file, pickle, card or log; a CPU run prints none of NOISE.
    args = ["--max_steps", "30", "--save_steps", "10", "--eval_steps", "15", "--logging_steps", "5", "--hub_token", FAKE_TOKEN]
    straight = run_tiny(tmp_path / "straight", *args)
    interrupted_dir = tmp_path / "interrupted"
    interrupted = run_tiny(interrupted_dir, *args)
    deadline = time.time() + 600  # a busy machine is slow to reach it; a checkpoint before step 10 fails below
    while not (interrupted_dir / "checkpoint-10").exists() and time.time() < deadline and interrupted.poll() is None:
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGTERM)
    output, _ = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 143, output[-3000:]
    assert "Run the same command again to resume" in output and not (interrupted_dir / "run_summary.json").exists()
    stopped_at = max(int(p.name.split("-")[1]) for p in interrupted_dir.glob("checkpoint-*"))
    assert 10 <= stopped_at < 30
    note = (interrupted_dir / "README.md").read_text()
    assert "# Unfinished training run" in note and f"step {stopped_at} of 30" in note and "[None]" not in note
    assert f"--output_dir {interrupted_dir}" in note and "--resume_from_checkpoint" in note and "<HUB_TOKEN>" in note
    assert json.loads((interrupted_dir / f"checkpoint-{stopped_at}" / "run_state-0.json").read_text())["num_tokens"] > 0

    resumed = run_tiny(interrupted_dir, *args)
    resumed_output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"Resuming from {interrupted_dir}/checkpoint-{stopped_at}" in resumed_output, resumed_output[-3000:]
    straight_output, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0
    a = json.loads((tmp_path / "straight" / "run_summary.json").read_text())
    b = json.loads((interrupted_dir / "run_summary.json").read_text())
    # Bit-exact, every logged loss: the resumed run trains its LoRA weights in the dtype the uninterrupted one did,
    # and its first log averages the same steps (sft.KeepRunState).
    assert (a["train_loss_final"], a["eval_loss_final"]) == (b["train_loss_final"], b["eval_loss_final"])
    assert losses_after(tmp_path / "straight", stopped_at) == losses_after(interrupted_dir, stopped_at)
    assert last_token_count(interrupted_dir / "checkpoint-30") == last_token_count(tmp_path / "straight" / "checkpoint-30")
    assert "# Unfinished training run" not in (interrupted_dir / "README.md").read_text()

    assert files_holding(tmp_path, FAKE_TOKEN) == []
    for log in (output, resumed_output, straight_output):
        assert FAKE_TOKEN not in log
    assert [noise for noise in NOISE if noise in straight_output] == []


SIGTERM_WHILE_PREPARING = """
import os, signal, sys, train_sft
from starsql.train import sft
prepare = sft.prepare_datasets
def preparing(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # a preempted job, while the data is prepared
    return prepare(*args, **kwargs)
sft.prepare_datasets = preparing
sys.exit(train_sft.main(sys.argv[1:]))
"""


def test_sigterm_while_preparing_data_exits_143_and_says_so(tmp_path, tiny_model_path):
    done = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_PREPARING, *TINY, "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=one_thread())  # fmt: skip
    assert done.returncode == 143, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Stopped by signal 15 before training started" in done.stdout and "Run the same command again" in done.stdout
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def config_mistake(tmp_path, mistake: str) -> tuple[list[str], str]:
    """The arguments of a mistake found before training, and what its one line must name."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: tiny-starcoder2\nlearning_rat: 0.1\n")
    if mistake == "missing-tracker" and any(importlib.util.find_spec(p) for p in ("tensorboard", "tensorboardX")):
        pytest.skip("tensorboard is installed here")
    args, expected = {
        "unknown-key": (["--config", str(bad)], "learning_rat"),
        "missing-file": ([*TINY[:2], "--dataset_name", "no-such-rows.jsonl"], "Dataset file not found: no-such-rows.jsonl"),
        "missing-tracker": ([*TINY, "--report_to", "trackio,tensorboard"], "--report_to tensorboard needs its package"),
    }[mistake]
    return [*args, "--output_dir", str(tmp_path / "out")], expected


def assert_one_line_error(code: int, stdout: str, stderr: str, expected: str):
    # Exit code 2, one line on stderr, before any data is prepared.
    assert code == 2 and expected in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "STARSQL_DEBUG=1" in lines[0], stderr[-3000:]
    assert "Data:" not in stdout


@pytest.mark.parametrize("mistake", ["unknown-key", "missing-file", "missing-tracker"])
def test_a_config_mistake_is_one_line_that_says_what_to_fix(tmp_path, tiny_model_path, mistake, capfd, monkeypatch):
    # train_sft.main in this process (the command itself: the test below); capfd sees every write to the process's
    # stdout and stderr, loggers' included. With STARSQL_DEBUG=1 the error goes on up: Python prints its traceback.
    import train_sft

    args, expected = config_mistake(tmp_path, mistake)
    monkeypatch.delenv("STARSQL_DEBUG", raising=False)
    capfd.readouterr()
    code = train_sft.main(args)
    assert_one_line_error(code, *capfd.readouterr(), expected)
    monkeypatch.setenv("STARSQL_DEBUG", "1")
    with pytest.raises(Exception) as error:
        train_sft.main(args)
    assert expected in str(error.value)


def test_a_config_mistake_stops_the_command_with_exit_code_2_and_one_line(tmp_path, tiny_model_path):
    # End to end, as a user runs it: the process's exit code and its whole stderr (imports, loading the tokenizer).
    args, expected = config_mistake(tmp_path, "missing-file")
    result = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={k: v for k, v in one_thread().items() if k != "STARSQL_DEBUG"})  # fmt: skip
    assert_one_line_error(result.returncode, result.stdout, result.stderr, expected)


def test_trackio_and_wandb_record_the_run_offline_and_never_the_token(tmp_path, tiny_model_path):
    # The trackers this ecosystem uses, both at once and offline: trackio's local database, W&B's offline run.
    import sqlite3

    env = one_thread(TRACKIO_DIR=str(tmp_path / "trackio"), WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"))
    proc = run_tiny(tmp_path / "out", "--report_to", "trackio,wandb", "--project", "starsql-test", "--max_steps", "2",
                    "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--hub_token", FAKE_TOKEN, env=env)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    with sqlite3.connect(tmp_path / "trackio" / "starsql-test.db") as db:
        logged = [json.loads(row[0]) for row in db.execute("SELECT metrics FROM metrics")]
    assert [entry["train/loss"] for entry in logged if "train/loss" in entry] and any("eval/loss" in e for e in logged)
    assert list((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files_holding(tmp_path, FAKE_TOKEN) == [] and FAKE_TOKEN not in output


def test_eval_spider_puts_execution_accuracy_in_the_card(tmp_path, tiny_model_path, spider_dir):
    out = tmp_path / "out"
    result = run_tiny(out, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2",
                      "--eval_spider", str(spider_dir), "--eval_limit", "6", "--eval_max_new_tokens", "16")
    output, _ = result.communicate(timeout=600)
    assert result.returncode == 0, output[-3000:]
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    results = meta["model-index"][0]["results"]
    metrics = {m["type"]: m["value"] for r in results for m in r["metrics"]}
    reports = json.loads((out / "eval_results.json").read_text())
    assert set(reports) == {"base", "adapter"} and reports["adapter"]["total"] == 6
    assert metrics["execution_accuracy"] == reports["adapter"]["execution_accuracy"]
    assert "![accuracy_by_hardness](accuracy_by_hardness.png)" in card and "### Spider dev, by hardness" in card


def test_every_recipe_parses_with_no_unknown_key():
    from trl import TrlParser

    from starsql.train.data import DataArguments
    from starsql.train.model import ModelArguments
    from starsql.train.sft import RunArguments, TrainingConfig

    for config in sorted((ROOT / "configs").glob("*.yaml")):
        parser = TrlParser((RunArguments, TrainingConfig, ModelArguments, DataArguments))
        _, training, model, data = parser.parse_args_and_config(["--config", str(config)])
        assert training.max_length in (512, 2048) and training.packing, config.name  # the tiny ones: 512
        assert model.use_peft and model.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"], config.name


def test_bf16_weights_and_layer_norms_train_as_on_a_bf16_gpu(tmp_path, tiny_model_path):
    # What a bf16 GPU now runs by default: 4-bit base with bf16 weights and compute dtype, bf16 autocast,
    # LayerNorm returning bf16. The CPU's autocast stands in for CUDA's.
    import math

    out = tmp_path / "bf16"
    proc = run_tiny(out, "--dtype", "bfloat16", "--bf16", "true", "--use_cpu", "true", "--max_steps", "6",
                    "--eval_steps", "3", "--save_steps", "6", "--logging_steps", "1")
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["hyperparameters"]["dtype"] == "bfloat16" and summary["hyperparameters"]["bf16"] is True
    assert math.isfinite(summary["train_loss_final"]) and math.isfinite(summary["eval_loss_final"])
    assert (out / "adapter_model.safetensors").is_file()


def test_batches_are_copied_to_the_gpu_without_waiting_unless_configured(monkeypatch):
    from starsql.train import sft
    from starsql.train.sft import TrainingConfig

    monkeypatch.setattr(sft, "accelerator_available", lambda: False)  # a CPU: nothing to pin or copy without waiting
    cpu = TrainingConfig(output_dir="x", report_to="none")
    assert cpu.dataloader_pin_memory is False and not cpu.accelerator_config.non_blocking
    monkeypatch.setattr(sft, "accelerator_available", lambda: True)
    assert TrainingConfig(output_dir="x", report_to="none").dataloader_pin_memory is True
    assert TrainingConfig(output_dir="x", report_to="none").accelerator_config.non_blocking is True
    chosen = TrainingConfig(output_dir="x", report_to="none", accelerator_config={"non_blocking": False})
    assert chosen.accelerator_config.non_blocking is False
    other = TrainingConfig(output_dir="x", report_to="none", accelerator_config={"split_batches": True})
    assert other.accelerator_config.non_blocking is True and other.accelerator_config.split_batches is True
