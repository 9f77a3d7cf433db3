"""Training speed: TRL's SFTTrainer, the same training in fewer host-GPU syncs and kernels.

`sft.run` trains with `FastSFTTrainer` when one of TrainingConfig's speed switches is on, and with TRL's
`SFTTrainer` when all are off. Each switch turns one fast path off on its own:
- `sync_free_step`: the training step keeps TRL's per-step metrics on the GPU until a log needs them and builds the
  packed attention mask without asking the GPU about the rows (`packed_masks_without_sync`), so Python queues the
  next kernels while the GPU runs the last ones. false: TRL's own `SFTTrainer.compute_loss`.
- `fused_lora`: each LoRA layer's adapter branch as one autograd function (`starsql.train.fused_lora`), eager runs.
- `compile_regions` (and `torch_compile`): compiled layers (`regional_compilation`) that round and draw dropout
  masks as eager ones do (`eager_numerics`).

The sync-free step mirrors TRL's step and reads TRL, transformers and accelerate internals (`missing_internals`
lists what it checks). The trainer checks them when it is built and refuses to start when one has changed, naming
it: a TRL upgrade then fails loudly instead of logging wrong metrics.
"""

import dataclasses
import inspect
import os
from contextlib import contextmanager, nullcontext

import torch
from transformers import masking_utils
from trl import SFTTrainer

from .fused_lora import fuse_lora

REGIONAL_COMPILATION = "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"

# What the sync-free step reads of the trainer beyond TRL's and transformers' public API (after __init__).
TRAINER_INTERNALS = (
    "_metrics",  # TRL: {"train"|"eval": {metric: per-step values}}, averaged by SFTTrainer.log
    "_total_train_tokens",  # TRL: the tokens trained on so far, logged as num_tokens
    "aux_loss_enabled",  # TRL: a MoE auxiliary loss (TRL's own step then)
    "label_smoother",  # Trainer: label smoothing (TRL's own step then)
    "compute_loss_func",  # Trainer: a custom loss function (TRL's own step then)
    "get_tp_size",  # Trainer: tensor-parallel ranks, in the loss's scaling across devices
)
ACCELERATOR_INTERNALS = (
    "parallelism_config",  # accelerate >= 1.12: TP/CP/SP set-ups (TRL's own step then)
    "gradient_state",  # .end_of_dataloader: the epoch's last batch, which DDP pads (TRL's own step then)
)
# TRL's FusedCausalLMOutput fields, what model(..., fused_lm_head=True) returns (trl.trainer.utils.add_fused_lm_head).
FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1", "label_mask")
# Names TRL's own SFTTrainer.compute_loss uses for what the sync-free step mirrors: when TRL's step stops using
# one, it computes its loss or metrics another way, and this step would no longer log what TRL's does.
TRL_STEP_NAMES = ("_metrics", "_total_train_tokens", "_tp_size", "gather_for_metrics", "aux_loss_enabled",
                  "label_smoother", "compute_loss_func", "loss_type", "average_tokens_across_devices", "get_tp_size",
                  "parallelism_config", *FUSED_OUTPUTS)  # fmt: skip


@contextmanager
def regional_compilation(enabled: bool):
    """Regional compilation for the Trainer built inside: TrainingArguments has no field for it, and accelerate
    reads it from the environment when the Trainer creates its TorchDynamoPlugin. Set only for that, so no later
    Trainer in the process inherits it."""
    saved = os.environ.get(REGIONAL_COMPILATION)
    if enabled:
        os.environ[REGIONAL_COMPILATION] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(REGIONAL_COMPILATION, None)
        else:
            os.environ[REGIONAL_COMPILATION] = saved


@contextmanager
def eager_numerics(enabled: bool):
    """While a compiled model trains: Inductor's kernels compute what eager ones do. Intermediates are rounded to
    bf16 where eager rounds them (emulate_precision_casts): otherwise a fused add keeps the LoRA output in fp32, and
    an early optimizer update smaller than bf16's spacing survives where eager rounds it away, so the losses drift
    from eager's. Dropout masks come from eager's random generator (fallback_random), not Inductor's, so a compiled
    run draws the same masks as an eager one."""
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


def missing_internals(trainer: SFTTrainer) -> list[str]:
    """What the sync-free step relies on that this TRL, transformers or accelerate lacks or does otherwise; empty
    when it can run. Reads attributes and code, runs nothing on the GPU."""
    missing = [f"SFTTrainer.{name}" for name in TRAINER_INTERNALS if not hasattr(trainer, name)]
    if not isinstance(getattr(trainer, "_metrics", None), dict) or "train" not in trainer._metrics:
        missing.append("SFTTrainer._metrics['train']")
    if not isinstance(getattr(trainer, "_total_train_tokens", None), int):
        missing.append("SFTTrainer._total_train_tokens (an int)")
    missing += [f"Accelerator.{name}" for name in ACCELERATOR_INTERNALS if not hasattr(trainer.accelerator, name)]
    if not hasattr(getattr(trainer.accelerator, "gradient_state", None), "end_of_dataloader"):
        missing.append("Accelerator.gradient_state.end_of_dataloader")
    for name in ("loss_type", "average_tokens_across_devices"):
        if not hasattr(trainer.args, name):
            missing.append(f"SFTConfig.{name}")
    try:
        from trl.trainer.utils import FusedCausalLMOutput

        fields = {field.name for field in dataclasses.fields(FusedCausalLMOutput)}
    except (ImportError, TypeError):
        fields = set()
    missing += [f"trl.trainer.utils.FusedCausalLMOutput.{name}" for name in FUSED_OUTPUTS if name not in fields]
    used = set(inspect.unwrap(SFTTrainer.compute_loss).__code__.co_names)
    missing += [f"SFTTrainer.compute_loss no longer uses `{name}`" for name in TRL_STEP_NAMES if name not in used]
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    find = getattr(masking_utils, "find_packed_sequence_indices", None)
    if find is None or not torch.equal(find(packed), _packed_sequence_ids(packed)):
        missing.append("transformers.masking_utils.find_packed_sequence_indices (the packed sequence ids)")
    return missing


def internals_error(missing: list[str]) -> RuntimeError:
    import accelerate
    import transformers
    import trl

    versions = f"trl {trl.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}"
    return RuntimeError(
        f"The sync-free training step (TrainingConfig.sync_free_step) mirrors TRL's SFTTrainer step and relies on "
        f"internals that {versions} lack or do otherwise: {'; '.join(missing)}. Set --sync_free_step false "
        "(`sync_free_step: false` in a YAML config) to train with TRL's own step."
    )


class FastSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with the fast paths TrainingConfig switches on (`args` must be a TrainingConfig):
    - built under regional compilation's settings (compile_regions); trains and evaluates under eager_numerics when
      compiled; LoRA layers fused after PEFT wraps the model (fused_lora, eager runs only).
    - sync_free_step: a training step without TRL's host-GPU syncs. TRL's per-step metrics (entropy, token
      accuracy, tokens seen) stay GPU tensors until a log needs them; TRL converts them at every step. The logged
      values are TRL's. Under DDP the conversion gathers across processes, so log() must run on every process,
      as Trainer calls it. The packed attention mask is built without its sync (packed_masks_without_sync). And
      the FLOPs estimate counts the model's parameters once: Trainer recounts them at every step, though they do
      not change while training. Other loss set-ups (label smoothing, DFT, a compute_loss_func, MoE, parallelism
      configs), evaluation, and the last batch of an epoch under DDP (which TRL's gather_for_metrics trims) run
      TRL's own step.
    """

    _parameter_count: int | None = None

    def __init__(self, model, args, *more, **kwargs):
        self._pending = []  # per training step: entropy sum, correct tokens, valid tokens, tokens (GPU tensors)
        with regional_compilation(args.compile_regions):
            super().__init__(model, args, *more, **kwargs)
        if args.fused_lora and not args.torch_compile:
            fuse_lora(self.model)
        if args.sync_free_step:
            missing = missing_internals(self)
            if missing:
                raise internals_error(missing)

    def train(self, *args, **kwargs):
        with eager_numerics(self.args.torch_compile):  # compiling happens in the first steps, not at build time
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        self._flush_metrics()  # TRL's evaluation logs the training tokens seen so far
        try:
            with eager_numerics(self.args.torch_compile):  # evaluation may compile its own graphs too
                return super().evaluate(*args, **kwargs)
        finally:
            # Regional compilation trains a copy of the model's containers (accelerate's compile_regions), so the
            # training step's model.train() leaves self.model's own flag off after an evaluation, and TRL, which
            # reads that flag, would log every later training step's metrics as eval_* ones.
            if self.is_in_train:
                self.model.train()

    def floating_point_ops(self, inputs: dict) -> int:
        if not self.args.sync_free_step:
            return super().floating_point_ops(inputs)
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameter_count  # Trainer.floating_point_ops' estimate

    def _plain_nll_step(self, model, return_outputs: bool) -> bool:
        """Whether this call is a training step the sync-free step computes as TRL's would."""
        last_ddp_batch = self.accelerator.num_processes > 1 and self.accelerator.gradient_state.end_of_dataloader
        return (self.args.sync_free_step and model.training and not return_outputs and not last_ddp_batch
                and self.compute_loss_func is None and self.label_smoother is None and self.args.loss_type == "nll"
                and not self.aux_loss_enabled and self.accelerator.parallelism_config is None)  # fmt: skip

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._plain_nll_step(model, return_outputs):
            self._flush_metrics()  # TRL's step appends its own: keep the steps in order
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL's loss for this case (SFTTrainer.compute_loss), with its metrics kept on the GPU.
        inputs["use_cache"] = False
        packed = "position_ids" in inputs and "attention_mask" not in inputs
        with packed_masks_without_sync() if packed else nullcontext():
            outputs = model(**inputs, fused_lm_head=True)
        absent = [name for name in FUSED_OUTPUTS if getattr(outputs, name, None) is None]
        if absent:  # TRL no longer asks its fused LM head for a field the metrics need
            raise internals_error([f"model(..., fused_lm_head=True).{name}" for name in absent])
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

    def _save_checkpoint(self, model, trial):
        self._flush_metrics()  # the token count a checkpoint keeps (sft.KeepRunState) includes every step before it
        return super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._flush_metrics()
        super().log(logs, start_time)
