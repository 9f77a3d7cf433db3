"""Training: data -> prompt -> SFTTrainer (packed, completion-only loss) -> adapter, curves, card, push.

`train_sft.py` parses the four argument dataclasses below (CLI flags and a YAML `--config`) and
calls `run`.
"""

import gc
import json
import os
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback, masking_utils
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from .card import CardInfo, write_model_card
from .data import DataArguments, prepare_datasets
from .fused_lora import fuse_lora
from .hub import preflight, push_folder
from .modeling import ModelArguments, load_model, load_tokenizer, lora_config
from .plots import plot_training_curves

EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what schedulers expect


@dataclass
class TrainingConfig(SFTConfig):
    """TRL's SFTConfig with the original recipe as defaults (all overridable)."""

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
    compile_regions: bool = field(
        default=False,
        metadata={"help": "torch.compile one decoder layer and reuse it for every layer (accelerate's regional "
                          "compilation; implies torch_compile): Inductor fuses the elementwise work around the "
                          "matmuls, rounding and dropout as eager does (starsql.train.eager_numerics): the same "
                          "losses within 1e-4. On an H100 its steps ran 1.14-1.3x eager's; compiling takes the "
                          "first two steps (100-140 s from empty caches), so one 250-step run of the fast recipe on "
                          "a fresh machine took 190 s against eager's 222 s on one host and 199-222 s against 177 s "
                          "on another (BENCHMARKS.md). On by default in starcoder2-3b-sql-fast.yaml."},
    )  # fmt: skip
    fused_lora: bool = field(
        default=True,
        metadata={"help": "Run each LoRA layer's adapter branch as one autograd function (starsql.fused_lora): "
                          "PEFT's arithmetic, bitwise for a power-of-two lora_alpha / r, in fewer kernels over the "
                          "activations. Eager training only: compiled layers get Inductor's fusion instead."},
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
            # that waits is a host-GPU sync, about four a step. A value the user gives wins.
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


@contextmanager
def regional_compilation(enabled: bool, dynamic: bool | None = None):
    """Regional compilation for the Trainer built inside: TrainingArguments has no field for it, and
    accelerate reads it from the environment when the Trainer creates its TorchDynamoPlugin. Set only
    for that, so no later Trainer in the process inherits it. `dynamic`: accelerate's dynamic-shape
    setting as well (None: leave it to torch.compile, which recompiles once lengths vary)."""
    settings = {"ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "1" if enabled else None,
                "ACCELERATE_DYNAMO_USE_DYNAMIC": None if dynamic is None else str(int(dynamic))}  # fmt: skip
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update({key: value for key, value in settings.items() if value is not None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def eager_numerics(enabled: bool):
    """While a compiled model trains: Inductor's kernels compute what eager ones do. Intermediates are
    rounded to bf16 where eager rounds them (emulate_precision_casts): without it a fused add keeps the
    LoRA output in fp32, and the first optimizer step's update, smaller than bf16's spacing, survives
    where eager rounds it away (1.7% lower loss at step 2 on an H100). Dropout masks come from eager's
    random generator (fallback_random), not Inductor's: ~5% of the compiled step's speed. The losses
    then match eager's within 2e-4 (BENCHMARKS.md)."""
    if not enabled:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(emulate_precision_casts=True, fallback_random=True):
        yield


def _packed_sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    first_dummy_value = position_ids[:, :1] - 1  # transformers' computation, without its early None
    return (torch.diff(position_ids, prepend=first_dummy_value, dim=-1) != 1).cumsum(-1)


@contextmanager
def packed_masks_without_sync():
    """transformers' find_packed_sequence_indices returns None when every row holds one sequence, and asks the
    GPU whether that is so: a host-GPU sync at every forward. The sequence ids it computes describe such rows
    too (all zeros: one sequence, the same attention mask), so inside this block they are returned without
    asking. For a row that does hold one sequence, SDPA then gets that mask explicitly instead of its causal
    shortcut: the same values, another kernel."""
    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = _packed_sequence_ids
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


class SQLTrainer(SFTTrainer):
    """TRL's SFTTrainer without the host-GPU syncs of its training step, so Python queues the next kernels
    while the GPU runs the last ones:
    - TRL's per-step metrics (entropy, token accuracy, tokens seen) stay GPU tensors until a log needs them; TRL
      converts them at every step (`.item()`, `num_valid > 0`, the token count: six syncs). The logged values
      are TRL's. Under DDP the conversion gathers across processes, so log() must run on every process, as
      Trainer calls it.
    - The packed attention mask is built without its sync (packed_masks_without_sync).
    - Trainer's FLOPs estimate counts the model's parameters once; Trainer recounts them at every step (~7 ms of
      Python over a 4-bit PEFT model's tensors). The parameters do not change while training, so neither does
      the count.
    TRL's LM head keeps its own syncs (it scores only the labelled positions). Other loss set-ups (label
    smoothing, DFT, a compute_loss_func, MoE, parallelism configs), and the last batch of an epoch under DDP
    (which TRL's gather_for_metrics trims), run TRL's own step."""

    _parameter_count: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending = []  # per training step: entropy sum, correct tokens, valid tokens, tokens (GPU tensors)

    def floating_point_ops(self, inputs: dict) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameter_count  # Trainer.floating_point_ops' estimate

    def _plain_nll_step(self, model, return_outputs: bool) -> bool:
        last_ddp_batch = self.accelerator.num_processes > 1 and self.accelerator.gradient_state.end_of_dataloader
        return (model.training and not return_outputs and not last_ddp_batch and self.compute_loss_func is None
                and self.label_smoother is None and self.args.loss_type == "nll" and not self.aux_loss_enabled
                and self.accelerator.parallelism_config is None)  # fmt: skip

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._plain_nll_step(model, return_outputs):
            self._flush_metrics()  # TRL's step appends its own: keep the steps in order
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL's loss for this case (SFTTrainer.compute_loss), with its metrics kept on the GPU.
        inputs["use_cache"] = False
        packed = "position_ids" in inputs and "attention_mask" not in inputs
        with packed_masks_without_sync() if packed else nullcontext():
            outputs = model(**inputs, fused_lm_head=True)
        per_token_loss = -outputs.log_probs  # zero on ignored positions
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            tokens = inputs["position_ids"].size(1)
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        self._pending.append((outputs.entropy.detach().sum(), outputs.is_top1.sum(), outputs.label_mask.sum(), tokens))
        if len(self._pending) >= 1000:  # nothing logs (logging_strategy "no"): bound what waits on the GPU
            self._flush_metrics()
        return loss

    def _flush_metrics(self):
        """The pending steps' metrics into TRL's lists, as TRL's compute_loss would have put them: per step, the
        sums over all processes, then entropy and accuracy per valid token. A few syncs per log instead of six
        per step."""
        if not self._pending:
            return
        device, world = self._pending[0][0].device, self.accelerator.num_processes

        def per_step(values):  # one value per step, each summed over the processes
            if all(isinstance(value, int) for value in values):
                stacked = torch.tensor(values, device=device)
            else:
                stacked = torch.stack([torch.as_tensor(value, device=device) for value in values])
            return self.accelerator.gather(stacked).view(world, -1).sum(0)

        entropy, correct, valid, tokens = (per_step(column) for column in zip(*self._pending))
        metrics = self._metrics["train"]
        metrics["entropy"] += torch.where(valid > 0, entropy / valid, 0.0).tolist()
        metrics["mean_token_accuracy"] += torch.where(valid > 0, correct / valid, 0.0).tolist()
        self._total_train_tokens += sum(tokens.tolist())
        metrics["num_tokens"] = [self._total_train_tokens]
        self._pending.clear()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._flush_metrics()
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        self._flush_metrics()  # TRL's evaluation logs the training tokens seen so far
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            # Regional compilation trains a copy of the model's containers (accelerate's compile_regions), so the
            # training step's model.train() leaves self.model's own flag off after an evaluation, and TRL, which
            # reads that flag, would log every later training step's metrics as eval_* ones.
            if self.is_in_train:
                self.model.train()


def build_trainer(model, training_args: TrainingConfig, peft_config, **kwargs) -> SQLTrainer:
    """The trainer as the project trains: built under regional compilation's settings, the model wrapped by
    PEFT (peft_config; None: full fine-tuning), then its LoRA layers fused (fused_lora, eager runs only)."""
    with regional_compilation(training_args.compile_regions):
        trainer = SQLTrainer(model=model, args=training_args, peft_config=peft_config, **kwargs)
    if training_args.fused_lora and not training_args.torch_compile:
        fuse_lora(trainer.model)
    return trainer


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


def used_hyperparameters(training_args: TrainingConfig, model_args: ModelArguments) -> dict:
    keys = [
        "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
        "max_steps", "num_train_epochs", "warmup_steps", "lr_scheduler_type", "optim", "adam_beta1", "adam_beta2",
        "adam_epsilon", "weight_decay", "seed", "max_length", "packing", "packing_strategy", "bf16", "fp16",
        "gradient_checkpointing", "compile_regions", "fused_lora",
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
    from .evaluate import evaluate_model, markdown_table

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

    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset, report = prepare_datasets(data_args, tokenizer, training_args.max_length)
    print(report.summary(), flush=True)
    if eval_dataset is None:
        training_args.eval_strategy = "no"
    if data_args.dataset_format == "raw-sql" and training_args.packing_strategy == "bfd":
        training_args.packing_strategy = "bfd_split"  # long SQL files are split across sequences, not cut

    model = load_model(model_args)
    stop = StopOnSignal()
    trainer = build_trainer(
        model, training_args, lora_config(model_args), train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, callbacks=[stop],
    )  # fmt: skip
    resume = resume_checkpoint(training_args, run_args)
    if resume:
        print(f"Resuming from {resume}")
    started = time.time()
    with eager_numerics(training_args.torch_compile):  # compiling happens in the first steps, not at build time
        result = trainer.train(resume_from_checkpoint=resume)
    wall_time = time.time() - started
    if stop.received is not None:
        print(
            f"Stopped by signal {stop.received} at step {trainer.state.global_step}; a checkpoint is in "
            f"{training_args.output_dir}. Run the same command again to resume. Nothing was pushed."
        )
        return EXIT_INTERRUPTED

    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    # Every process evaluates: under DDP the evaluation gathers the losses across them.
    with eager_numerics(training_args.torch_compile):  # evaluation may compile its own graphs too
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
