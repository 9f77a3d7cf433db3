"""Training: data -> prompt -> SFTTrainer (packed, completion-only loss) -> adapter, curves, card, push.

`train_sft.py` parses the four argument dataclasses (CLI flags and a YAML `--config`) and calls `run`,
which reads like TRL's own `trl/scripts/sft.py`: tokenizer and data, model, trainer, train, save, card, push.
TrainingConfig's speed switches select `speed.FastSFTTrainer`, a subclass of SFTTrainer that trains the
same way in fewer host-GPU syncs and kernels; with all of them off the trainer is TRL's SFTTrainer.
"""

import gc
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager
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


def accelerator_available() -> bool:
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


@dataclass
class TrainingConfig(SFTConfig):
    """TRL's SFTConfig with the original recipe as defaults (all overridable), and the speed switches of
    starsql.train.speed: sync_free_step, fused_lora, compile_regions. With an accelerator, the batch's copies to it
    do not wait (accelerator_config non_blocking, unless the config gives its own value); without one, the
    dataloader pins no memory."""

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
    # transformers 5 renamed gradient checkpointing to activation checkpointing and warns on the old name, which TRL's
    # SFTConfig sets by default (True); TRL's default, under the new name, so only a config that uses the old one warns.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5)."}
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory (TRL's default: true). "
                          "Replaces gradient_checkpointing."},
    )  # fmt: skip
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
        if isinstance(self.report_to, str) and "," in self.report_to:  # --report_to trackio,wandb
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default
        if not accelerator_available():
            self.dataloader_pin_memory = False  # pinned memory only speeds copies to an accelerator (torch warns)
        if accelerator_available() and (self.accelerator_config is None or isinstance(self.accelerator_config, dict)):
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
    eval_max_new_tokens: int = field(default=256, metadata={"help": "Longest SQL generated per Spider dev question."})


class ConfigError(ValueError):
    """A mistake in the command line or config (or what it points at), found before training: the command-line
    entry point reports it in one line that says what to fix."""


class TrainingInterrupted(BaseException):
    """A SIGTERM outside the training loop: while preparing data and the model, or while saving after it. A
    BaseException, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, phase: str):
        super().__init__(signum, phase)
        self.signum, self.phase = signum, phase


@contextmanager
def config_mistakes():
    """Errors of the set-up (bad values, missing files, an unknown model or tracker, the Hub refusing) as
    ConfigError, whose message says what to fix."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, OSError, ImportError) as error:
        raise ConfigError(str(error).strip() or type(error).__name__) from error


class StopOnSignal(TrainerCallback):
    """SIGTERM (a preempted job, a scheduler's stop), for the whole run: inside the training loop it saves a
    checkpoint at the end of the step and stops the loop cleanly; before the loop (data preparation, model loading)
    or after it (saving, evaluating, pushing) it stops at once with TrainingInterrupted."""

    def __init__(self):
        self.received = None
        self.phase = "preparing"  # -> "training" -> "finishing"
        self._previous = {}

    @contextmanager
    def installed(self):
        try:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            pass
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()

    def _handle(self, signum, frame):
        self.received = signum
        if self.phase != "training":
            raise TrainingInterrupted(signum, self.phase)

    def on_train_begin(self, args, state, control, **kwargs):
        self.phase = "training"

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.phase = "finishing"


RUN_STATE_FILE = "run_state-{rank}.json"  # in each checkpoint, one per process


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "<HUB_TOKEN>") if secret else text


class KeepRunState(TrainerCallback):
    """What Trainer's checkpoints leave out, kept beside them (RUN_STATE_FILE), so a resumed run logs and computes
    what the uninterrupted one did:
    - TRL's count of the tokens trained on (logged as num_tokens) lives in the trainer, not in TrainerState: a
      resumed run would count from zero.
    - Trainer's loss summed since the last log, and that log's step: a resumed run's first logged loss would
      average only the steps after the checkpoint.
    - TRL trains a 4-bit base's LoRA weights in bf16, but resuming loads the adapter through PEFT, which upcasts it
      to fp32 (and the optimizer's state with it when it is loaded): a resumed run would go on in another
      precision, its losses parting from the uninterrupted run's from the first step. The trainable weights and
      their optimizer state go back to the dtypes the trainer built them in (bf16 -> fp32 -> bf16 is exact).
    And TRL writes a placeholder model card to output_dir at every checkpoint; until the run's own card replaces
    it, output_dir's README.md says the run is unfinished and how to resume it."""

    def __init__(self, trainer, command: str):
        self.trainer, self.command = trainer, command
        self.dtypes = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
        self.saved: dict = {}

    def resume(self, checkpoint: str):
        """Before training from `checkpoint`: read what this process kept there; TRL's token count as it was."""
        saved = Path(checkpoint) / RUN_STATE_FILE.format(rank=self.trainer.args.process_index)
        if saved.is_file():
            self.saved = json.loads(saved.read_text())
            self.trainer._total_train_tokens = self.saved["num_tokens"]
            return
        state = Path(checkpoint) / "trainer_state.json"  # a checkpoint from before: the last logged count
        if state.is_file():
            history = json.loads(state.read_text()).get("log_history", [])
            counts = [entry["num_tokens"] for entry in history if "num_tokens" in entry]
            if counts:
                self.trainer._total_train_tokens = int(counts[-1])

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        optimizer_state = getattr(getattr(optimizer, "optimizer", optimizer), "state", {})
        for name, param in self.trainer.model.named_parameters():
            dtype = self.dtypes.get(name)
            if dtype is None or param.dtype == dtype:
                continue
            param.data = param.data.to(dtype)
            for key, value in optimizer_state.get(param, {}).items():  # Adam's moments, not its step count
                if torch.is_tensor(value) and value.is_floating_point() and value.shape == param.shape:
                    optimizer_state[param][key] = value.to(dtype)
        trainer = self.trainer
        if self.saved.get("step") == state.global_step and hasattr(trainer, "_tr_loss"):
            # Trainer has just set these to zero and the resumed step; its train_loss then averages the same steps.
            trainer._tr_loss.fill_(self.saved["loss_since_log"])
            trainer._globalstep_last_logged = trainer._initial_global_step = self.saved["last_logged_step"]

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir() and hasattr(trainer, "_total_train_tokens"):
            kept = {"step": state.global_step, "num_tokens": int(trainer._total_train_tokens)}
            if hasattr(trainer, "_tr_loss") and hasattr(trainer, "_globalstep_last_logged"):
                kept |= {"loss_since_log": trainer._tr_loss.item(), "last_logged_step": trainer._globalstep_last_logged}
            (checkpoint / RUN_STATE_FILE.format(rank=args.process_index)).write_text(json.dumps(kept))
        if state.is_world_process_zero:
            write_unfinished_card(Path(args.output_dir), state.global_step, state.max_steps, self.command)


def write_unfinished_card(output_dir: Path, step: int, max_steps: int, command: str) -> Path:
    card = output_dir / "README.md"
    card.write_text(
        "---\ntags:\n- unfinished-training-run\n---\n\n# Unfinished training run\n\n"
        f"This folder holds the checkpoints of a training run that has not finished: step {step} of {max_steps}. "
        "There is no trained model here yet; the model card replaces this note when the run completes.\n\n"
        "To resume, run the same command again from the same working directory. It continues from the last "
        f"`checkpoint-*` folder here (or name one with `--resume_from_checkpoint {output_dir}/checkpoint-{step}`):\n\n"
        f"```bash\n{command}\n```\n"
    )
    return card


def check_trackers(report_to) -> None:
    """Every tracker in --report_to is one transformers knows and is installed: a missing one fails here, before
    the data is prepared, instead of when the trainer is built."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"--report_to {name}: unknown tracker; use one of {', '.join(INTEGRATION_TO_CALLBACK)} or none.")
        try:
            INTEGRATION_TO_CALLBACK[name]()  # each integration's callback checks its package when built
        except (RuntimeError, ImportError) as error:
            raise ConfigError(f"--report_to {name} needs its package, which is not installed: {error}") from error


def command_line() -> str:
    """The command that started this process, to repeat to resume (the token already taken out of sys.argv)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        return shlex.join(["python", os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0], *argv[1:]])
    return shlex.join([Path(sys.executable).name, *argv])


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
        "activation_checkpointing", "compile_regions", "fused_lora", "sync_free_step",
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
        batch_size=run_args.eval_generation_batch_size, compare=model_args.use_peft, max_new_tokens=run_args.eval_max_new_tokens,
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
    """Train, then write adapter + tokenizer + curves + card to output_dir, then push. Returns an exit code:
    0, or EXIT_INTERRUPTED after a SIGTERM. A mistake in the set-up raises ConfigError before training starts."""
    # The token is used here and never stored: Trainer pickles its arguments (training_args.bin) into output_dir
    # and every checkpoint, and trackers record them.
    token, training_args.hub_token = training_args.hub_token, None
    stop = StopOnSignal()
    with stop.installed():
        try:
            return _run(run_args, training_args, model_args, data_args, stop, token)
        except TrainingInterrupted as interrupted:
            if interrupted.phase == "preparing":
                print(f"Stopped by signal {interrupted.signum} before training started (while preparing the data "
                      "or the model); nothing was trained or pushed. Run the same command again to start.", flush=True)
            else:
                print(f"Stopped by signal {interrupted.signum} after training, while saving; the last checkpoint is "
                      f"in {training_args.output_dir}. Run the same command again to finish. Nothing was pushed.",
                      flush=True)  # fmt: skip
            return EXIT_INTERRUPTED


def _run(run_args, training_args, model_args, data_args, stop: StopOnSignal, token: str | None) -> int:
    push = training_args.push_to_hub
    training_args.push_to_hub = False  # one push, after success, with the card: never a half-trained upload
    repo_id = None
    with config_mistakes():
        check_trackers(training_args.report_to)
        if push:
            repo_id = preflight(training_args.hub_model_id, private=run_args.hub_private, token=token)
            print(f"Hub: will push to https://huggingface.co/{repo_id} after training.")

        # Tokenizer and data
        try:
            tokenizer = load_tokenizer(model_args)
        except (OSError, ValueError) as error:  # neither a local folder nor a Hub model (or the Hub unreachable)
            raise ConfigError(f"--model_name_or_path {model_args.model_name_or_path}: {error}") from error
        train_dataset, eval_dataset, report = prepare_datasets(data_args, tokenizer, training_args.max_length)
        print(report.summary(), flush=True)
        if eval_dataset is None:
            training_args.eval_strategy = "no"
        if data_args.dataset_format == "raw-sql" and training_args.packing_strategy == "bfd":
            training_args.packing_strategy = "bfd_split"  # long SQL files are split across sequences, not cut

        # Model and trainer (PEFT wraps the model in the trainer: peft_config)
        model = load_model(model_args)
        trainer = trainer_class(training_args)(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=lora_config(model_args),
            callbacks=[stop],
        )
    run_state = KeepRunState(trainer, redact(command_line(), token))
    trainer.add_callback(run_state)

    # Train
    resume = resume_checkpoint(training_args, run_args)
    if resume:
        print(f"Resuming from {resume}")
        run_state.resume(resume)
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
        datasets=[source["source"] for source in report.as_dict().get("sources", [])] or [data_args.dataset_name],
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
        push_folder(output_dir, repo_id, token=token)
        print(f"Pushed to https://huggingface.co/{repo_id}")
    return 0
