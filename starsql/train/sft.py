"""Training: data -> prompt -> SFTTrainer (packed, completion-only loss) -> adapter, curves, card, push.

`train_sft.py` parses the four argument dataclasses (CLI flags and a YAML `--config`) and calls `run`,
which reads like TRL's own `trl/scripts/sft.py`: tokenizer and data, model, trainer, train, save, card, push.
TrainingConfig's speed switches select `speed.FastSFTTrainer`, a subclass of SFTTrainer that trains the
same way in fewer host-GPU syncs and kernels; with all of them off the trainer is TRL's SFTTrainer.
"""

import gc
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from .card import CardInfo, write_model_card
from .data import DataArguments, prepare_datasets
from .hub import preflight, push_folder
from .model import ModelArguments, load_model, load_tokenizer, lora_config
from .plots import plot_training_curves

EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what schedulers expect


@dataclass
class TrainingConfig(SFTConfig):
    """TRL's SFTConfig with the original recipe as defaults (all overridable), and the speed switches of
    starsql.train.speed: sync_free_step, fused_lora, compile_regions. The batch's copies to the GPU do not wait
    (accelerator_config non_blocking, unless the config gives its own value)."""

    output_dir: str | None = field(default="starcoder2-3b-sql")
    learning_rate: float = field(default=2e-4)
    per_device_train_batch_size: int = field(default=1)
    per_device_eval_batch_size: int = field(default=8)
    gradient_accumulation_steps: int = field(default=4)
    seed: int = field(default=0)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.999)
    adam_epsilon: float = field(default=1e-8)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=100)
    max_steps: int = field(default=1000)
    max_length: int | None = field(default=512)
    packing: bool = field(default=True)
    eval_strategy: str = field(default="steps")
    eval_steps: float | None = field(default=100)
    save_steps: float = field(default=100)
    save_total_limit: int | None = field(default=2)
    report_to: None | str | list[str] = field(default="none")
    # DDP (`accelerate launch`): every LoRA weight gets a gradient at every step, so skip DDP's
    # per-step search for unused parameters.
    ddp_find_unused_parameters: bool | None = field(default=False)
    sync_free_step: bool = field(
        default=True,
        metadata={"help": "Keep TRL's per-step metrics (entropy, token accuracy, tokens seen) on the GPU until a log "
                          "needs them, and build the packed attention mask without asking the GPU, so Python queues "
                          "the next kernels instead of waiting; the loss and logged values are TRL's. false: TRL's "
                          "own training step (SFTTrainer.compute_loss)."},
    )  # fmt: skip
    fused_lora: bool = field(
        default=True,
        metadata={"help": "Run each LoRA layer's adapter branch as one autograd function (starsql.train.fused_lora): "
                          "PEFT's arithmetic in fewer kernels over the activations, bitwise PEFT's for a power-of-two "
                          "lora_alpha / r. Eager training only: compiled layers get Inductor's fusion instead."},
    )  # fmt: skip
    compile_regions: bool = field(
        default=False,
        metadata={"help": "torch.compile one decoder layer and reuse it for every layer (accelerate's regional "
                          "compilation; implies torch_compile), so Inductor fuses the elementwise work around the "
                          "matmuls. It rounds and draws dropout masks as eager layers do, for the same losses; "
                          "compiling takes the first steps."},
    )  # fmt: skip

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            # bf16 where the GPU has it, fp16 on older GPUs (T4, V100), full precision on CPU.
            has_cuda = torch.cuda.is_available()
            self.bf16 = has_cuda and torch.cuda.is_bf16_supported()
            self.fp16 = has_cuda and not self.bf16
        if self.ddp_backend is None and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Several processes on CPUs: without a backend each would train alone and all would write. Without
            # use_cpu, accelerate sees no accelerator and leaves the processes unwrapped (no gradient all-reduce).
            self.ddp_backend, self.use_cpu = "gloo", True
        if self.compile_regions:
            self.torch_compile = True
        if self.accelerator_config is None or isinstance(self.accelerator_config, dict):
            # The batch's copies to the GPU from the dataloader's pinned memory without waiting for them: a copy
            # that waits is a host-GPU sync. A value the user gives wins.
            self.accelerator_config = {"non_blocking": True, **(self.accelerator_config or {})}
        super().__post_init__()


@dataclass
class RunArguments:
    auto_resume: bool = field(
        default=True, metadata={"help": "Resume from the last checkpoint in output_dir when there is one."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    space_id: str | None = field(default=None, metadata={"help": "The demo Space, for the card's usage snippet."})
    license: str = field(default="bigcode-openrail-m", metadata={"help": "License in the card (the base model's)."})
    eval_spider: str | None = field(
        default=None,
        metadata={"help": "Spider dev folder: after training, score execution accuracy (base vs fine-tuned) for the card."},
    )
    eval_limit: int | None = field(default=None, metadata={"help": "Score only the first N Spider dev questions."})
    eval_generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generate() call."})


class StopOnSignal(TrainerCallback):
    """On SIGTERM (a preempted job, Ctrl-C in a scheduler) save a checkpoint, then stop cleanly."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM,):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def trainer_class(training_args: TrainingConfig) -> type[SFTTrainer]:
    """TRL's SFTTrainer, or with a speed switch on (sync_free_step, fused_lora, compiling) its subclass in
    starsql.train.speed, which trains the same way in fewer host-GPU syncs and kernels."""
    if training_args.sync_free_step or training_args.fused_lora or training_args.torch_compile:
        from .speed import FastSFTTrainer

        return FastSFTTrainer
    return SFTTrainer


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


def used_hyperparameters(training_args: TrainingConfig, model_args: ModelArguments) -> dict:
    keys = [
        "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "max_steps", "num_train_epochs", "warmup_steps", "lr_scheduler_type", "optim", "adam_beta1", "adam_beta2",
        "adam_epsilon", "weight_decay", "seed", "max_length", "packing", "packing_strategy", "bf16", "fp16",
        "gradient_checkpointing", "compile_regions", "fused_lora", "sync_free_step",
    ]  # fmt: skip
    used = {key: getattr(training_args, key) for key in keys}
    used["optim"] = str(used["optim"]).split(".")[-1].lower()
    used["world_size"] = training_args.world_size
    model_keys = ["model_name_or_path", "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "use_peft"]
    if model_args.use_peft:
        model_keys += ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"]
    used.update({key: getattr(model_args, key) for key in model_keys})
    used["dtype"] = str(model_args.dtype).replace("torch.", "")
    return used


def resume_checkpoint(training_args: TrainingConfig, run_args: RunArguments) -> str | None:
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if run_args.auto_resume and os.path.isdir(training_args.output_dir):
        return get_last_checkpoint(training_args.output_dir)
    return None


def add_spider_evaluation(info: CardInfo, run_args: RunArguments, model_args: ModelArguments, output_dir: Path):
    """Score base and fine-tuned model on Spider dev; put the numbers, table and chart in the card."""
    from ..evaluate.cli import evaluate_model
    from ..evaluate.report import markdown_table

    base, adapter = (model_args.model_name_or_path, str(output_dir)) if model_args.use_peft else (str(output_dir), None)
    reports = evaluate_model(
        base, adapter, spider_dir=run_args.eval_spider, out_dir=output_dir / "eval_spider", limit=run_args.eval_limit,
        batch_size=run_args.eval_generation_batch_size, compare=model_args.use_peft,
    )
    tuned = reports["adapter" if model_args.use_peft else "base"]
    dataset = f"Spider dev ({tuned['label']})"
    info.metrics += [
        {"name": "Execution accuracy", "type": "execution_accuracy", "value": tuned["execution_accuracy"], "dataset": dataset, "dataset_type": "spider"},
        {"name": "Exact match", "type": "exact_match", "value": tuned["exact_match"], "dataset": dataset, "dataset_type": "spider"},
    ]
    (output_dir / "eval_results.json").write_text(json.dumps(reports, indent=2))
    chart = output_dir / "eval_spider" / "accuracy_by_hardness.png"
    if chart.is_file():
        shutil.copy(chart, output_dir / chart.name)
        info.images.append(chart.name)
    info.extra_sections.append("### Spider dev, by hardness\n\n" + markdown_table(reports))


def run(run_args: RunArguments, training_args: TrainingConfig, model_args: ModelArguments, data_args: DataArguments):
    """Train, then write adapter + tokenizer + curves + card to output_dir, then push. Returns an exit code."""
    push = training_args.push_to_hub
    training_args.push_to_hub = False  # one push, after success, with the card: never a half-trained upload
    repo_id = None
    if push:
        repo_id = preflight(training_args.hub_model_id, private=run_args.hub_private, token=training_args.hub_token)
        print(f"Hub: will push to https://huggingface.co/{repo_id} after training.")

    # Tokenizer and data
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset, report = prepare_datasets(data_args, tokenizer, training_args.max_length)
    print(report.summary(), flush=True)
    if eval_dataset is None:
        training_args.eval_strategy = "no"
    if data_args.dataset_format == "raw-sql" and training_args.packing_strategy == "bfd":
        training_args.packing_strategy = "bfd_split"  # long SQL files are split across sequences, not cut

    # Model and trainer (PEFT wraps the model in the trainer: peft_config)
    model = load_model(model_args)
    stop = StopOnSignal()
    trainer = trainer_class(training_args)(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
        callbacks=[stop],
    )

    # Train
    resume = resume_checkpoint(training_args, run_args)
    if resume:
        print(f"Resuming from {resume}")
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    wall_time = time.time() - started
    if stop.received is not None:
        print(
            f"Stopped by signal {stop.received} at step {trainer.state.global_step}; a checkpoint is in "
            f"{training_args.output_dir}. Run the same command again to resume. Nothing was pushed."
        )
        return EXIT_INTERRUPTED

    # Save, curves, card, push
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    # Every process evaluates: under DDP the evaluation gathers the losses across them.
    eval_loss = trainer.evaluate()["eval_loss"] if eval_dataset is not None else None
    if not trainer.is_world_process_zero():
        return 0
    curves = plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    train_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {
        "train_loss_final": train_losses[-1] if train_losses else result.training_loss,
        "eval_loss_final": eval_loss,
        "global_step": trainer.state.global_step,
        "wall_time_s": wall_time,
        "hardware": hardware(),
        "data": report.as_dict(),
        "hyperparameters": used_hyperparameters(training_args, model_args),
    }
    (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    info = CardInfo(
        base_model=model_args.model_name_or_path,
        model_id=repo_id or str(output_dir),
        datasets=[data_args.dataset_name],
        hyperparameters=summary["hyperparameters"],
        data_report=report.as_dict(),
        final_train_loss=summary["train_loss_final"],
        final_eval_loss=eval_loss,
        hardware=summary["hardware"],
        wall_time_s=wall_time,
        license=run_args.license,
        space_id=run_args.space_id,
        use_peft=model_args.use_peft,
        images=[curves.name] if curves else [],
    )
    if run_args.eval_spider:
        del trainer, model  # free the GPU for the evaluation models
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        add_spider_evaluation(info, run_args, model_args, output_dir)
    card = write_model_card(output_dir, info)
    print(f"Saved {'adapter' if model_args.use_peft else 'model'}, tokenizer, {card.name} and curves to {output_dir}")
    if repo_id:
        push_folder(output_dir, repo_id, token=training_args.hub_token)
        print(f"Pushed to https://huggingface.co/{repo_id}")
    return 0
