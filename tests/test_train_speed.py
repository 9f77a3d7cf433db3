"""The speed switches of starsql.train.speed (sync-free step, fused LoRA, compiled layers), alone and under DDP:
each trains as TRL's own SFTTrainer does, to the bit or to a rounding, and says so loudly when TRL changes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_train import TINY, one_thread

@pytest.mark.parametrize("compiled", [False, True], ids=["fused-lora", "compiled-layers"])
def test_two_processes_train_as_one_ddp_job(tmp_path, tiny_model_path, compiled):
    # What `accelerate launch --num_processes 2 train_sft.py` does on 2 GPUs, on 2 CPU processes (gloo):
    # one job of world size 2, each rank its own 4-bit copy, and only rank 0 writes the outputs. Eager layers
    # (fused LoRA, with dropout) and compiled ones, as the fast recipe runs.
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_sft.py",
               "--config", "configs/tiny.yaml", "--output_dir", str(out), "--max_steps", "4", "--eval_steps", "4",
               "--save_steps", "4", "--lora_dropout", "0.05", "--compile_regions", str(compiled).lower()]  # no --ddp_backend: gloo on CPUs
    if compiled:  # the wiring under DDP (Dynamo, AOTAutograd, accelerate); Inductor's kernels: compile_runs below
        command += ["--torch_compile_backend", "aot_eager"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=one_thread())
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["hyperparameters"]["world_size"] == 2
    assert (summary["hyperparameters"]["compile_regions"], summary["hyperparameters"]["fused_lora"]) == (compiled, True)
    assert summary["global_step"] == 4
    assert done.stdout.count("Saved adapter") == 1
    assert (out / "adapter_model.safetensors").is_file()


# Counts what --compile_regions does inside train_sft: graphs compiled, calls of accelerate's regional path, and
# Inductor's numerics settings while training and after.
COMPILE_PROBE = (
    "import os, sys, train_sft, torch._dynamo.utils as dynamo, accelerate.accelerator as acc\n"
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
    "sys.exit(code)"
)


@pytest.fixture(scope="module")
def compile_runs(tiny_model_path, tmp_path_factory):
    """The tiny recipe under COMPILE_PROBE, 4 steps logged one by one with an evaluation after step 2: eager, and
    with --compile_regions (Inductor). One pair of runs for the tests of compiled training below."""
    folder = tmp_path_factory.mktemp("compile")

    def train(name, *extra):
        out = folder / name
        done = subprocess.run([sys.executable, "-c", COMPILE_PROBE, *TINY, "--output_dir", str(out), "--max_steps", "4",
                               "--eval_steps", "2", "--save_steps", "4", "--logging_steps", "1", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=one_thread())  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        graphs, regions, env, numerics, left = done.stdout.split("PROBE")[-1].split()[:5]
        history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        return {"out": out, "history": history, "losses": [e["loss"] for e in history if "loss" in e],
                "graphs": int(graphs), "regions": int(regions), "env": env, "numerics": (numerics, left)}  # fmt: skip

    return train("eager"), train("compiled", "--compile_regions", "true")


def test_compile_regions_compiles_the_layers_and_trains_as_eager(compile_runs):
    # --compile_regions: accelerate compiles one decoder layer and reuses it for all of them. Same losses as
    # the eager run on CPU, graphs really compiled, by accelerate's regional path (a whole-model compile
    # would pass the rest), the setting not left in the environment, PEFT's own key names in the adapter.
    from safetensors import safe_open

    eager, compiled = compile_runs
    assert (eager["graphs"], eager["regions"]) == (0, 0) and compiled["graphs"] > 0 and compiled["regions"] == 1
    assert compiled["env"] == "None"
    # Compiled layers round and draw dropout masks as eager ones do while training, and only then.
    assert compiled["numerics"] == ("1", "0") and eager["numerics"] == ("0", "0")
    losses, eager_losses = compiled["losses"], eager["losses"]
    assert len(losses) == 4 and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(losses, eager_losses)), (losses, eager_losses)
    summary = json.loads((compiled["out"] / "run_summary.json").read_text())
    assert summary["hyperparameters"]["compile_regions"] is True
    with safe_open(str(compiled["out"] / "adapter_model.safetensors"), "pt") as adapter:
        assert not [key for key in adapter.keys() if "_orig_mod" in key]


def test_compiled_training_logs_its_metrics_as_training_ones_after_an_evaluation(compile_runs):
    # Regional compilation trains a copy of the model's containers; after an evaluation, TRL read the original's
    # training flag (left off) and logged every later training step's entropy, accuracy and tokens as eval_* ones.
    _, compiled = compile_runs
    history = compiled["history"]
    training = [e for e in history if "loss" in e]
    assert [e["step"] for e in training] == [1, 2, 3, 4] and any("eval_loss" in e for e in history[:3])
    for entry in training:
        assert {"entropy", "mean_token_accuracy", "num_tokens"} <= entry.keys(), entry
        assert not [key for key in entry if key.startswith("eval_")], entry
    assert [e["num_tokens"] for e in training] == sorted({e["num_tokens"] for e in training})  # counted on, per step


def test_eager_numerics_sets_inductors_settings_only_inside():
    import torch._inductor.config as inductor

    from starsql.train.speed import eager_numerics

    before = (inductor.emulate_precision_casts, inductor.fallback_random)
    with eager_numerics(True):
        assert (inductor.emulate_precision_casts, inductor.fallback_random) == (True, True)
    with eager_numerics(False):
        assert (inductor.emulate_precision_casts, inductor.fallback_random) == before
    assert (inductor.emulate_precision_casts, inductor.fallback_random) == before


def test_regional_compilation_sets_accelerates_setting_only_inside(monkeypatch):
    from starsql.train.speed import regional_compilation

    key = "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"
    monkeypatch.delenv(key, raising=False)
    with regional_compilation(True):
        assert os.environ.get(key) == "1"
    with regional_compilation(False):
        assert key not in os.environ
    assert key not in os.environ
    monkeypatch.setenv(key, "0")  # the user's own setting comes back afterwards
    with regional_compilation(True):
        assert os.environ[key] == "1"
    assert os.environ[key] == "0"


def tiny_trainer(tmp_path, model_path, trainer=None, **config):
    """A trainer on the tiny QLoRA model and four rows: trainer_class(config)'s choice unless `trainer` is given."""
    from datasets import Dataset

    from starsql.train.model import ModelArguments, load_model, load_tokenizer, lora_config
    from starsql.train.sft import TrainingConfig, trainer_class

    model_args = ModelArguments(model_name_or_path=str(model_path), load_in_4bit=True)
    rows = Dataset.from_list([{"prompt": "-- Question: how many?\n", "completion": "SELECT 1;"}] * 4)
    args = TrainingConfig(**dict(output_dir=str(tmp_path), max_steps=1, eval_strategy="no", report_to="none",
                                 use_cpu=True) | config)  # fmt: skip
    return (trainer or trainer_class(args))(model=load_model(model_args), args=args, peft_config=lora_config(model_args),
                                            train_dataset=rows, processing_class=load_tokenizer(model_args))  # fmt: skip


def test_every_speed_switch_off_is_trls_own_trainer(tmp_path, tiny_model_path):
    from trl import SFTTrainer

    from starsql.train.sft import TrainingConfig, trainer_class
    from starsql.train.speed import FastSFTTrainer

    def chosen(**switches):
        return trainer_class(TrainingConfig(output_dir=str(tmp_path), report_to="none", **switches))

    off = dict(sync_free_step=False, fused_lora=False, compile_regions=False)
    assert chosen() is FastSFTTrainer and chosen(**off) is SFTTrainer
    for switch in ("sync_free_step", "fused_lora", "compile_regions", "torch_compile"):
        assert chosen(**off | {switch: True}) is FastSFTTrainer, switch


def test_the_sync_free_step_finds_every_trl_internal_it_relies_on(tmp_path, tiny_model_path):
    # The names the sync-free step reads of the installed TRL, transformers and accelerate are all there: the
    # check that guards a TRL upgrade passes, and is not vacuous.
    from starsql.train.speed import FastSFTTrainer, missing_internals

    trainer = tiny_trainer(tmp_path, tiny_model_path)
    assert isinstance(trainer, FastSFTTrainer) and trainer.args.sync_free_step
    assert missing_internals(trainer) == []
    del trainer._metrics
    assert "SFTTrainer._metrics" in missing_internals(trainer)


def _drop_total_train_tokens(monkeypatch):
    from trl import SFTTrainer

    init = SFTTrainer.__init__

    def without_token_count(self, *args, **kwargs):  # a TRL that renamed its token count
        init(self, *args, **kwargs)
        del self._total_train_tokens

    monkeypatch.setattr(SFTTrainer, "__init__", without_token_count)
    return "SFTTrainer._total_train_tokens"


def _change_trls_step(monkeypatch):
    from trl import SFTTrainer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # accuracy computed otherwise
        outputs = model(**inputs, fused_lm_head=True)
        self._metrics["train"]["entropy"].append(outputs.entropy.mean().item())
        self._total_train_tokens += outputs.label_mask.sum().item() // self._tp_size
        return -outputs.log_probs.sum() / self.accelerator.gather_for_metrics(outputs.label_mask.sum()).sum()

    monkeypatch.setattr(SFTTrainer, "compute_loss", compute_loss)
    return "SFTTrainer.compute_loss no longer uses `is_top1`"


def _change_transformers_packed_ids(monkeypatch):
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: position_ids)
    return "transformers.masking_utils.find_packed_sequence_indices"


@pytest.mark.parametrize("change", [_drop_total_train_tokens, _change_trls_step, _change_transformers_packed_ids],
                         ids=["trainer-attribute", "trl-step", "transformers-helper"])  # fmt: skip
def test_a_changed_trl_internal_stops_the_sync_free_step_loudly(tmp_path, tiny_model_path, monkeypatch, change):
    # A TRL (or transformers) that no longer has what the sync-free step mirrors: building the trainer fails,
    # naming what changed and the switch that trains with TRL's own step, which then builds.
    name = change(monkeypatch)
    with pytest.raises(RuntimeError) as error:
        tiny_trainer(tmp_path / "on", tiny_model_path)
    assert name in str(error.value) and "--sync_free_step false" in str(error.value), str(error.value)
    trainer = tiny_trainer(tmp_path / "off", tiny_model_path, sync_free_step=False)
    assert not trainer.args.sync_free_step


def test_sync_free_step_false_trains_with_trls_own_step_and_the_same_logs(tmp_path, tiny_model_path, monkeypatch):
    # --sync_free_step false: every training step goes through TRL's SFTTrainer.compute_loss (the trainer is still
    # the subclass, for fused_lora). The default step never calls it while training, and logs the same values.
    import functools

    from transformers import set_seed
    from trl import SFTTrainer

    from starsql.train.speed import FastSFTTrainer

    calls, compute_loss = [], SFTTrainer.compute_loss

    @functools.wraps(compute_loss)  # the check of TRL's step reads the wrapped function
    def counted(self, model, *args, **kwargs):
        calls.append(model.training)
        return compute_loss(self, model, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "compute_loss", counted)

    def train(sync_free: bool):
        calls.clear()
        set_seed(0)
        trainer = tiny_trainer(tmp_path / str(sync_free), tiny_model_path, sync_free_step=sync_free, max_steps=4,
                               per_device_train_batch_size=2, logging_steps=1, learning_rate=5e-3, warmup_steps=0,
                               save_strategy="no", disable_tqdm=True)  # fmt: skip
        assert isinstance(trainer, FastSFTTrainer)
        trainer.train()
        timing = ("runtime", "per_second", "total_flos")
        return list(calls), [{k: v for k, v in e.items() if not any(t in k for t in timing)} for e in trainer.state.log_history]

    trl_calls, trl_logs = train(False)
    calls_here, logs = train(True)
    assert trl_calls == [True] * 4 and calls_here == []
    assert logs == trl_logs and len(logs) == 5
    assert all(k in logs[0] for k in ("loss", "entropy", "mean_token_accuracy", "num_tokens"))


def test_the_trainer_counts_parameters_once_for_its_flops(tmp_path, tiny_model_path):
    # Trainer recounts the model's parameters at every step for total_flos; the sync-free step counts them once
    # and gives the same estimate.
    from trl import SFTTrainer

    from starsql.train.speed import FastSFTTrainer

    trainer = tiny_trainer(tmp_path, tiny_model_path)
    assert isinstance(trainer, FastSFTTrainer)
    counted, count = [], trainer.model.num_parameters
    trainer.model.num_parameters = lambda **kwargs: counted.append(kwargs) or count(**kwargs)
    inputs = {"input_ids": torch.zeros(2, 7, dtype=torch.long)}
    flops = [trainer.floating_point_ops(inputs) for _ in range(3)]
    assert flops == [SFTTrainer.floating_point_ops(trainer, inputs)] * 3 and flops[0] > 0
    assert len(counted) == 2  # once for FastSFTTrainer's three calls, once for SFTTrainer's reference call
    assert trainer.floating_point_ops({"labels": inputs["input_ids"]}) == 0  # no main input: no estimate, as Trainer


def test_the_training_step_reads_no_tensor_values_and_logs_trls_metrics(tmp_path, tiny_model_path, monkeypatch):
    # The sync-free step keeps TRL's metrics as tensors until a log needs them, and builds the packed attention mask
    # without asking whether rows hold one sequence: no .item(), bool() or .tolist() in the step, where TRL's
    # SFTTrainer has several, each a host-GPU sync on a GPU. (On a GPU, TRL's LM head keeps two of its own: boolean-
    # mask indexing of the labelled positions, which it skips on a CPU.) The logs, train and eval, are TRL's to the bit.
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    from starsql.train.model import ModelArguments, load_model, load_tokenizer, lora_config
    from starsql.train.sft import TrainingConfig
    from starsql.train.speed import FastSFTTrainer

    model_args = ModelArguments(model_name_or_path=str(tiny_model_path), load_in_4bit=True, lora_r=8, lora_alpha=16)
    tokenizer = load_tokenizer(model_args)
    rows = [{"prompt": f"-- Question: how many rows in table t{i}?\n" + "-- Schema: CREATE TABLE t (a INT);\n" * (i % 3),
             "completion": f"SELECT COUNT(*) FROM t{i} WHERE a > {i};"} for i in range(40)]  # fmt: skip
    asked = []

    def count_values(method):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, **kwargs):
            if inside_step:
                asked.append(method)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)

    for method in ("item", "tolist", "__bool__", "__int__", "__float__"):
        count_values(method)

    def train(trainer_class):
        args = TrainingConfig(output_dir=str(tmp_path / trainer_class.__name__), max_steps=6, per_device_train_batch_size=2,
                              logging_steps=2, eval_strategy="steps", eval_steps=3, save_strategy="no", report_to="none",
                              use_cpu=True, learning_rate=5e-3, warmup_steps=0, disable_tqdm=True)  # fmt: skip
        set_seed(0)
        trainer = trainer_class(model=load_model(model_args), args=args, peft_config=lora_config(model_args),
                                train_dataset=Dataset.from_list(rows[:32]), eval_dataset=Dataset.from_list(rows[32:]),
                                processing_class=tokenizer)  # fmt: skip
        assert trainer.padding_free  # packed rows, position_ids: the mask path this is about
        compute_loss = trainer.compute_loss

        def step_loss(*args, **kwargs):
            nonlocal inside_step
            inside_step = trainer.model.training
            try:
                return compute_loss(*args, **kwargs)
            finally:
                inside_step = False

        trainer.compute_loss = step_loss
        asked.clear()
        trainer.train()
        timing = ("runtime", "per_second")
        return list(asked), [{k: v for k, v in e.items() if not any(t in k for t in timing)} for e in trainer.state.log_history]

    inside_step = False
    trl_asked, trl_logs = train(SFTTrainer)
    asked_here, logs = train(FastSFTTrainer)
    assert len(trl_asked) >= 6 * 4, trl_asked  # the check sees TRL's per-step conversions
    assert asked_here == []
    assert logs == trl_logs
    assert [e["num_tokens"] for e in logs if "loss" in e][-1] > 0 and any("eval_num_tokens" in e for e in logs)
    assert all(k in logs[0] for k in ("loss", "entropy", "mean_token_accuracy", "grad_norm"))


def test_packed_masks_without_sync_are_transformers_masks():
    from transformers import masking_utils

    from starsql.train.speed import packed_masks_without_sync

    original = masking_utils.find_packed_sequence_indices
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 0, 1]])
    single = torch.arange(9).unsqueeze(0)
    with packed_masks_without_sync():
        assert masking_utils.find_packed_sequence_indices is not original
        assert torch.equal(masking_utils.find_packed_sequence_indices(packed), original(packed))
        # One sequence a row: transformers says None (no packing), this the ids meaning the same, without asking.
        assert original(single) is None
        assert torch.equal(masking_utils.find_packed_sequence_indices(single), torch.zeros_like(single))
    assert masking_utils.find_packed_sequence_indices is original


@pytest.mark.parametrize("attention", ["eager", "flex_attention"])
def test_packed_masks_without_sync_give_the_same_attention_masks(attention):
    # Through transformers' own mask builder, sliding window as StarCoder2 builds it: packed rows, and a row
    # holding one sequence whose positions do not start at 0 (where transformers returns its plain causal mask).
    from transformers import Starcoder2Config, masking_utils

    from starsql.train.speed import packed_masks_without_sync

    config = Starcoder2Config(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    config._attn_implementation = attention
    for position_ids in (torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]), torch.arange(3, 12).unsqueeze(0)):
        embeds = torch.zeros(1, position_ids.size(1), 8)

        def mask():
            built = masking_utils.create_sliding_window_causal_mask(config, embeds, None, None, position_ids)
            if attention == "flex_attention":  # a BlockMask: its mask function at every (query, key) pair
                n, zero = position_ids.size(1), torch.tensor(0)
                return torch.tensor([[bool(built.mask_mod(zero, zero, torch.tensor(q), torch.tensor(k)))
                                      for k in range(n)] for q in range(n)])  # fmt: skip
            return built

        expected = mask()
        with packed_masks_without_sync():
            got = mask()
        assert torch.equal(got, expected), (position_ids, got, expected)


DDP_LOGS = """
import json, sys
from datasets import Dataset
from transformers import set_seed
from trl import SFTTrainer
from starsql.train.model import ModelArguments, load_model, load_tokenizer, lora_config
from starsql.train.sft import TrainingConfig
from starsql.train.speed import FastSFTTrainer

model_path, out = sys.argv[1], sys.argv[2]
model_args = ModelArguments(model_name_or_path=model_path, load_in_4bit=True, lora_r=8, lora_alpha=16)
rows = Dataset.from_list([{"prompt": f"-- how many in t{i}?\\n" * (1 + i % 3), "completion": f"SELECT {i};"}
                          for i in range(33)])  # 33 rows over 2 ranks x 2: the epoch's last batch is uneven
logs = {}
for trainer_class in (SFTTrainer, FastSFTTrainer):  # one after the other in the same job, each from the same seed
    args = TrainingConfig(output_dir=f"{out}/{trainer_class.__name__}", max_steps=11, per_device_train_batch_size=2,
                          gradient_accumulation_steps=1, packing=False, logging_steps=1, eval_strategy="no",
                          save_strategy="no", report_to="none", learning_rate=5e-3, warmup_steps=0, disable_tqdm=True)
    set_seed(0)
    trainer = trainer_class(model=load_model(model_args), args=args, peft_config=lora_config(model_args),
                            train_dataset=rows, processing_class=load_tokenizer(model_args))
    assert trainer.accelerator.num_processes == 2 and trainer.accelerator.distributed_type != "NO"
    trainer.train()
    logs[trainer_class.__name__] = [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
                                    for e in trainer.state.log_history]
if trainer.is_world_process_zero():
    with open(f"{out}/logs.json", "w") as f:
        json.dump(logs, f)
"""


def test_two_processes_log_trls_metrics_across_an_epochs_uneven_end(tmp_path, tiny_model_path):
    # Under DDP, TRL gathers its metrics with gather_for_metrics, which drops the padding duplicates of an epoch's
    # uneven last batch; FastSFTTrainer runs TRL's own step there, so every log, before and after, is TRL's.
    script = tmp_path / "ddp_logs.py"
    script.write_text(DDP_LOGS)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(tiny_model_path), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=one_thread(PYTHONPATH=str(ROOT)))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    logs = json.loads((tmp_path / "logs.json").read_text())
    trl_logs, logs_here = logs["SFTTrainer"], logs["FastSFTTrainer"]
    assert len(logs_here) == 12  # 11 steps and the summary; step 9 ends the epoch (33 rows, 4 a step)
    assert logs_here == trl_logs
