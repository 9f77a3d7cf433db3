"""The tiny recipe end to end: trains, writes adapter + curves + card, resumes after SIGTERM."""

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


def run_tiny(out, *extra, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "train_sft.py"), *TINY, "--output_dir", str(out), *extra],
                            cwd=ROOT, env=env or os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes_to_the_same_loss(tmp_path, tiny_model_path):
    args = ["--max_steps", "60", "--save_steps", "10", "--eval_steps", "30", "--logging_steps", "5"]
    straight = run_tiny(tmp_path / "straight", *args)
    interrupted_dir = tmp_path / "interrupted"
    interrupted = run_tiny(interrupted_dir, *args)
    deadline = time.time() + 120
    while not (interrupted_dir / "checkpoint-10").exists() and time.time() < deadline and interrupted.poll() is None:
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGTERM)
    output, _ = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 143, output[-3000:]
    assert "Run the same command again to resume" in output and not (interrupted_dir / "run_summary.json").exists()
    stopped_at = max(int(p.name.split("-")[1]) for p in interrupted_dir.glob("checkpoint-*"))
    assert 10 <= stopped_at < 60

    resumed = run_tiny(interrupted_dir, *args)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"Resuming from {interrupted_dir}/checkpoint-{stopped_at}" in output, output[-3000:]
    straight.communicate(timeout=300)
    assert straight.returncode == 0
    a = json.loads((tmp_path / "straight" / "run_summary.json").read_text())
    b = json.loads((interrupted_dir / "run_summary.json").read_text())
    assert abs(a["train_loss_final"] - b["train_loss_final"]) < 1e-3
    assert abs(a["eval_loss_final"] - b["eval_loss_final"]) < 1e-3


def test_unknown_config_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: tiny-starcoder2\nlearning_rat: 0.1\n")
    result = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--config", str(bad)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "learning_rat" in result.stderr


def test_eval_spider_puts_execution_accuracy_in_the_card(tmp_path, tiny_model_path, spider_dir):
    out = tmp_path / "out"
    result = run_tiny(out, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2",
                      "--eval_spider", str(spider_dir), "--eval_limit", "6")
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

    from starsql.data import DataArguments
    from starsql.modeling import ModelArguments
    from starsql.train import RunArguments, TrainingConfig

    for config in sorted((ROOT / "configs").glob("*.yaml")):
        parser = TrlParser((RunArguments, TrainingConfig, ModelArguments, DataArguments))
        _, training, model, data = parser.parse_args_and_config(["--config", str(config)])
        assert training.max_length == 512 and training.packing, config.name
        assert model.use_peft and model.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"], config.name


@pytest.mark.parametrize("compiled", [False, True], ids=["fused-lora", "compiled-layers"])
def test_two_processes_train_as_one_ddp_job(tmp_path, tiny_model_path, compiled):
    # What `accelerate launch --num_processes 2 train_sft.py` does on 2 GPUs, on 2 CPU processes (gloo):
    # one job of world size 2, each rank its own 4-bit copy, and only rank 0 writes the outputs. Eager layers
    # (fused LoRA, with dropout) and compiled ones, as the fast recipe runs.
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_sft.py",
               "--config", "configs/tiny.yaml", "--output_dir", str(out), "--max_steps", "4", "--eval_steps", "4",
               "--save_steps", "4", "--lora_dropout", "0.05", "--compile_regions", str(compiled).lower()]  # no --ddp_backend: gloo on CPUs
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["hyperparameters"]["world_size"] == 2
    assert (summary["hyperparameters"]["compile_regions"], summary["hyperparameters"]["fused_lora"]) == (compiled, True)
    assert summary["global_step"] == 4
    assert done.stdout.count("Saved adapter") == 1
    assert (out / "adapter_model.safetensors").is_file()


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


def test_compile_regions_compiles_the_layers_and_trains_as_eager(tmp_path, tiny_model_path):
    # --compile_regions: accelerate compiles one decoder layer and reuses it for all of them. Same losses as
    # the eager run on CPU, graphs really compiled, by accelerate's regional path (a whole-model compile
    # would pass the rest), the setting not left in the environment, PEFT's own key names in the adapter.
    from safetensors import safe_open

    probe = ("import os, sys, train_sft, torch._dynamo.utils as dynamo, accelerate.accelerator as acc\n"
             "import transformers, torch._inductor.config as inductor\n"
             "regions, real = [], acc.compile_regions\n"
             "acc.compile_regions = lambda model, **kw: regions.append(1) or real(model, **kw)\n"
             "numerics, train = [], transformers.Trainer.train\n"  # Inductor's settings while the layers compile
             "transformers.Trainer.train = lambda self, *a, **k: numerics.append(\n"
             "    int(inductor.emulate_precision_casts and inductor.fallback_random)) or train(self, *a, **k)\n"
             "code = train_sft.main(sys.argv[1:])\n"
             "print('PROBE', dynamo.counters['stats']['unique_graphs'], len(regions),\n"
             "      os.environ.get('ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION'), numerics[0],\n"
             "      int(inductor.emulate_precision_casts or inductor.fallback_random))\n"
             "sys.exit(code)")

    def train(out, *extra):
        done = subprocess.run([sys.executable, "-c", probe, *TINY, "--output_dir", str(out), "--max_steps", "4",
                               "--eval_steps", "4", "--save_steps", "4", "--logging_steps", "1", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        graphs, regions, env, numerics, left = done.stdout.split("PROBE")[-1].split()[:5]
        return [e["loss"] for e in history if "loss" in e], int(graphs), int(regions), env, (numerics, left)

    eager_losses, eager_graphs, eager_regions, _, eager_numerics = train(tmp_path / "eager")
    losses, graphs, regions, env, numerics = train(tmp_path / "compiled", "--compile_regions", "true")
    assert (eager_graphs, eager_regions) == (0, 0) and graphs > 0 and regions == 1
    assert env == "None"
    # Compiled layers round and draw dropout masks as eager ones do while training, and only then.
    assert numerics == ("1", "0") and eager_numerics == ("0", "0")
    assert len(losses) == 4 and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(losses, eager_losses)), (losses, eager_losses)
    summary = json.loads((tmp_path / "compiled" / "run_summary.json").read_text())
    assert summary["hyperparameters"]["compile_regions"] is True
    with safe_open(str(tmp_path / "compiled" / "adapter_model.safetensors"), "pt") as adapter:
        assert not [key for key in adapter.keys() if "_orig_mod" in key]


def test_eager_numerics_sets_inductors_settings_only_inside():
    import torch._inductor.config as inductor

    from starsql.train import eager_numerics

    before = (inductor.emulate_precision_casts, inductor.fallback_random)
    with eager_numerics(True):
        assert (inductor.emulate_precision_casts, inductor.fallback_random) == (True, True)
    with eager_numerics(False):
        assert (inductor.emulate_precision_casts, inductor.fallback_random) == before
    assert (inductor.emulate_precision_casts, inductor.fallback_random) == before


def test_regional_compilation_sets_accelerates_settings_only_inside():
    import os

    from starsql.train import regional_compilation

    keys = ("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "ACCELERATE_DYNAMO_USE_DYNAMIC")
    before = {key: os.environ.get(key) for key in keys}
    with regional_compilation(True, dynamic=False):
        assert [os.environ.get(key) for key in keys] == ["1", "0"]
    with regional_compilation(False):
        assert [os.environ.get(key) for key in keys] == [before[key] for key in keys]
    assert {key: os.environ.get(key) for key in keys} == before


def test_the_trainer_counts_parameters_once_for_its_flops(tmp_path, tiny_model_path):
    # Trainer recounts the model's parameters at every step for total_flos; SQLTrainer counts them once and
    # gives the same estimate.
    from datasets import Dataset
    from trl import SFTTrainer

    from starsql.modeling import ModelArguments, load_model, load_tokenizer, lora_config
    from starsql.train import SQLTrainer, TrainingConfig, build_trainer

    model_args = ModelArguments(model_name_or_path=str(tiny_model_path), load_in_4bit=True)
    rows = Dataset.from_list([{"prompt": "-- Question: how many?\n", "completion": "SELECT 1;"}] * 4)
    args = TrainingConfig(output_dir=str(tmp_path), max_steps=1, eval_strategy="no", report_to="none", use_cpu=True)
    trainer = build_trainer(load_model(model_args), args, lora_config(model_args), train_dataset=rows,
                            processing_class=load_tokenizer(model_args))  # fmt: skip
    assert isinstance(trainer, SQLTrainer)
    counted, count = [], trainer.model.num_parameters
    trainer.model.num_parameters = lambda **kwargs: counted.append(kwargs) or count(**kwargs)
    inputs = {"input_ids": torch.zeros(2, 7, dtype=torch.long)}
    flops = [trainer.floating_point_ops(inputs) for _ in range(3)]
    assert flops == [SFTTrainer.floating_point_ops(trainer, inputs)] * 3 and flops[0] > 0
    assert len(counted) == 2  # once for SQLTrainer's three calls, once for SFTTrainer's reference call
    assert trainer.floating_point_ops({"labels": inputs["input_ids"]}) == 0  # no main input: no estimate, as Trainer
