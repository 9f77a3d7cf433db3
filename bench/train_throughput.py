"""QLoRA training throughput of StarCoder2-3B (random weights): a plain hand-written loop vs the project's
SFTTrainer path, and speed-ups on top of it. One JSON line per configuration, then a summary table.

    python3 bench/train_throughput.py --out $OUT/train.jsonl          # GPU: stops starting configs after 450 s
    python3 bench/train_throughput.py --smoke                         # CPU, tiny model, < 1 min
    python3 bench/train_throughput.py --only sft-mb16-flex,sft-mb16-compile   # a subset (+ baseline, loss refs)
    python3 bench/train_throughput.py --add "sft-mb24-ckpt:mb=24,ckpt=1"      # an extra config

Configurations (CONFIGS below):
- plain-*: baseline A, transformers + PEFT + bitsandbytes by hand: 4-bit NF4 base, LoRA r16 on the six
  projections, SDPA, 16 fixed 512-token rows of real token ids, AdamW, bf16 autocast; with and without
  gradient checkpointing.
- profile=True configs also report their top GPU kernels (torch.profiler, last 2 warm-up steps: with --warmup 6
  these come after torch.compile's recompiles for the first new sequence lengths).
- sft-*: the project's path: starsql.train.model.load_model + starsql.train.sft.TrainingConfig + the trainer
  starsql.train.sft.trainer_class picks (trl.SFTTrainer or its subclass starsql.train.speed.FastSFTTrainer; BFD
  packing, padding-free, completion-only loss); tokens counted by the trainer (num_input_tokens_seen).
  Micro-batch 16 with and without checkpointing, 32 (after an OOM, the largest that should fit, estimated from
  mb16's peak), Liger (if liger_kernel patches starcoder2), flex_attention (needs attention dropout 0, so
  against SDPA with dropout 0), TrainingConfig(compile_regions=True) (train_sft.py's --compile_regions; compiled
  configs train under starsql.train.speed.eager_numerics as train_sft.py does: inductor.emulate_precision_casts=false,
  inductor.fallback_random=false give the compiled runs before it) and torch_compile of the whole model; small-card-mb4-ckpt
  is the profile for a 16 GB card. sft-* load as train_sft.py does (ModelArguments defaults: weights outside the 4-bit
  layers in the compute dtype, LayerNorm returning bf16 under autocast); half_ln=0 and dtype=float32 give the path before.
Step time: between optimizer steps after `--warmup` steps, CUDA synchronised. Every step's loss is kept; a config
that computes the same thing on the same rows as its loss reference must match its losses within 1%.

On a GPU each configuration runs in its own process: a crash, an OOM or a torch.compile that hangs cannot
poison the next one, peak memory is per configuration, and a per-configuration timeout plus a total budget
(--budget_s) bound the run. --mode inprocess runs them in this process instead (the --smoke default).
"""

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import (
    DATA, LORA_TARGETS, bnb_4bit_config, card, device, emit, ensure_model, free_memory, max_rel_diff, peak_gib,
    peak_reserved_gib, ratio, run_child, sync, table,
)  # fmt: skip

SEQ = 512
BASELINE = "plain-ckpt"
LOSS_REF = {"plain": "plain-ckpt", "sft": "sft-mb16-ckpt"}  # same data order and seed: losses must agree
NO_DROPOUT = {"model.residual_dropout": 0.0, "model.embedding_dropout": 0.0, "margs.lora_dropout": 0.0}
NON_BLOCKING = {"args.accelerator_config": {"non_blocking": True}}
EXPANDABLE = {"env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}
WORKERS = {"args.dataloader_num_workers": 2}
# heavy: compiles kernels (slow on CPU, skipped in --smoke unless named with --only); timeout: seconds on GPU.
CONFIGS = [
    dict(name="plain-ckpt", path="plain", mb=16, ckpt=True),
    dict(name="plain-nockpt", path="plain", mb=16, ckpt=False),
    dict(name="sft-mb16-ckpt", path="sft", mb=16, ckpt=True),
    dict(name="sft-mb16", path="sft", mb=16, ckpt=False),
    dict(name="sft-mb32", path="sft", mb=32, ckpt=False, fallback="sft-mb16"),  # on OOM: the largest mb that fits
    dict(name="small-card-mb4-ckpt", path="sft", mb=4, ckpt=True, mem_limit_gib=15),  # must fit a 16 GB card
    dict(name="sft-mb16-liger", path="sft", mb=16, ckpt=False, liger=True),
    # flex_attention (block-sparse masks of the packed documents) refuses attention dropout, which StarCoder2-3B
    # trains with (0.1): measured without it, against SDPA without it.
    dict(name="sft-mb16-attndrop0", path="sft", mb=16, ckpt=False, **{"model.attention_dropout": 0.0}),
    # DDP over 2 GPUs with SDPA (no compile step): against sft-mb16-attndrop0 on one GPU.
    dict(name="sft-mb16-attndrop0-2gpu", path="sft", mb=16, ckpt=False, procs=2, loss_ref="sft-mb16-attndrop0",
         timeout=240, **{"model.attention_dropout": 0.0}),
    dict(name="sft-mb16-flex", path="sft", mb=16, ckpt=False, attn="flex_attention", heavy=True, timeout=180, profile=True,
         loss_ref="sft-mb16-attndrop0", **{"model.attention_dropout": 0.0}),
    # The same with PEFT's own LoRA forward (fused_lora=false, the shipped path before starsql.train.fused_lora):
    # the same losses (bitwise: compare losses_exact), more kernels.
    dict(name="sft-mb16-flex-peft", path="sft", mb=16, ckpt=False, attn="flex_attention", heavy=True, timeout=180,
         profile=True, fused_lora=False, loss_ref="sft-mb16-flex", **{"model.attention_dropout": 0.0}),
    # Where the GPU waits between kernels (gpu_idle): the batch's copies to the GPU without blocking the CPU
    # (pinned memory is the Trainer's default), and the CUDA allocator growing segments instead of freeing
    # its cache and calling cudaMalloc (both synchronise). Same computation: same losses. (The non-blocking
    # copies are now TrainingConfig's default, so every sft-* config has them.)
    *[dict(name=name, path="sft", mb=16, ckpt=False, attn="flex_attention", heavy=True, timeout=180, profile=True,
           loss_ref="sft-mb16-flex", **{"model.attention_dropout": 0.0}, **extra)
      for name, extra in (("sft-mb16-flex-nonblocking", NON_BLOCKING),
                          ("sft-mb16-flex-expandable", EXPANDABLE),
                          # ...and the next batch collated by 2 worker processes while the GPU runs this one.
                          ("sft-mb16-flex-nonblocking-workers", NON_BLOCKING | WORKERS),
                          ("sft-mb16-flex-nonblocking-workers-expandable", NON_BLOCKING | WORKERS | EXPANDABLE))],
    # Regional compilation (accelerate compiles one decoder block and reuses it for all 30): minutes less compiling.
    dict(name="sft-mb16-compile-regional", path="sft", mb=16, ckpt=False, compile=True, regional=True, heavy=True,
         timeout=240),
    dict(name="sft-mb16-compile", path="sft", mb=16, ckpt=False, compile=True, heavy=True, timeout=300),
    # Compiled SDPA without any dropout, against eager flex without any dropout (eager SDPA and flex agree to 5e-5):
    # tells whether a compiled run's loss difference comes from compiling flex_attention or from compiling at all.
    dict(name="sft-mb16-compile-regional-nodrop", path="sft", mb=16, ckpt=False, compile=True, heavy=True, timeout=300,
         regional=True, loss_ref="sft-mb16-flex-nodrop",
         **{"model.attention_dropout": 0.0}, **NO_DROPOUT),
    # flex_attention on top of the other levers: checkpointing (small cards), bigger micro-batches (its cost grows
    # linearly with packed rows, SDPA's quadratically), DDP over 2 GPUs (one 4-bit copy per GPU, micro-batch 16 on
    # each: against sft-mb16-flex on one), torch.compile of the whole model. Loss reference: sft-mb16-flex.
    *[dict({"loss_ref": "sft-mb16-flex"}, **cfg, attn="flex_attention", heavy=True, **{"model.attention_dropout": 0.0})
      for cfg in (dict(name="sft-mb16-flex-ckpt", path="sft", mb=16, ckpt=True, timeout=240),
                  dict(name="sft-mb16-flex-2gpu", path="sft", mb=16, ckpt=False, procs=2, timeout=300),
                  dict(name="sft-mb32-flex", path="sft", mb=32, ckpt=False, timeout=240),
                  dict(name="small-card-mb4-flex-ckpt", path="sft", mb=4, ckpt=True, timeout=240, mem_limit_gib=15),
                  dict(name="sft-mb16-flex-compile", path="sft", mb=16, ckpt=False, compile=True, timeout=420),
                  # No autocast (bf16: false): every weight outside the LoRA layers in bf16 (TRL casts LoRA to bf16).
                  dict(name="sft-mb16-flex-pure-bf16", path="sft", mb=16, ckpt=False, timeout=240, **{"args.bf16": False}),
                  # The path before ModelArguments.dtype defaulted to the compute dtype: TRL's float32 default kept
                  # embeddings, norms, biases and the 4-bit compute dtype in fp32, and autocast's LayerNorm returned
                  # fp32, so the residual stream, dropouts, adds and flex_attention's inputs were fp32.
                  # Its loss reference is the bf16 path: expect ~0.8% apart (the residual stream's rounding).
                  dict(name="sft-mb16-flex-fp32-params", path="sft", mb=16, ckpt=False, timeout=240, profile=True,
                       dtype="float32", half_ln=False),
                  # The load before load_model's bf16 default: fp32 load, weights then cast to bf16
                  # (bitsandbytes' compute dtype stays fp32; autocast's matmuls are bf16 either way).
                  dict(name="sft-mb16-flex-castparams", path="sft", mb=16, ckpt=False, timeout=240,
                       dtype="float32", cast_params=True),
                  # PEFT drops out each adapted projection's input on its own: three dropouts of the same
                  # activations for q, k and v, six a layer. Without LoRA dropout (a recipe change: no loss check).
                  dict(name="sft-mb16-flex-loradrop0", path="sft", mb=16, ckpt=False, timeout=240,
                       **{"margs.lora_dropout": 0.0}),
                  # One decoder layer compiled and reused for all 30 (whole-model compile timed out at 401 s):
                  # Inductor fuses the elementwise work around the matmuls (dropouts, LoRA adds, casts, GELU).
                  dict(name="sft-mb16-flex-compile-regional", path="sft", mb=16, ckpt=False, compile=True,
                       regional=True, timeout=360),
                  dict(name="sft-mb16-flex-compile-regional-loradrop0", path="sft", mb=16, ckpt=False, compile=True,
                       timeout=360, regional=True, **{"margs.lora_dropout": 0.0}),
                  # Compiled dropouts draw other random masks than eager ones, so compile's loss check runs with
                  # every dropout off (model and LoRA): same computation, only the kernels differ.
                  dict(name="sft-mb16-flex-nodrop", path="sft", mb=16, ckpt=False, timeout=240, **NO_DROPOUT),
                  dict(name="sft-mb16-flex-compile-regional-nodrop", path="sft", mb=16, ckpt=False, compile=True,
                       timeout=360, regional=True,
                       loss_ref="sft-mb16-flex-nodrop", **NO_DROPOUT))],
]
DEFAULT_TIMEOUT = 120


def parse_add(spec: str) -> dict:
    """'NAME:key=value,...' -> a config. Keys: path (sft|plain), mb, ckpt, attn, liger, compile, regional, dynamic
    (accelerate's dynamic shapes from the first step), fused_lora (false: PEFT's LoRA forward), timeout, procs, step1 (keep the first optimizer step's
    gradients and weight changes), step1_ref (compare them with that config's: it must have step1 too),
    lora_init (false: LoRA's B random as well as A), inductor.FIELD (a torch._inductor.config value),
    loss_ref, args.FIELD for any TrainingConfig field, margs.FIELD for any ModelArguments field and model.FIELD
    for a model config value (sft path), e.g. args.packing_strategy=wrapped, margs.lora_r=8 or model.attention_dropout=0."""
    name, _, rest = spec.partition(":")
    config = {"name": name, "path": "sft", "mb": 16, "ckpt": False}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in ("ckpt", "liger", "compile", "regional", "dynamic", "heavy", "profile", "half_ln", "cast_params", "step1") or value.lower() in ("true", "false"):
            config[key] = value.lower() in ("1", "true")
        else:
            try:
                config[key] = int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:
                config[key] = value
    return config


# ---------------------------------------------------------------- data


def training_rows(tokenizer):
    """The repo's sql-create-context rows through the project's data pipeline (prompt/completion pairs)."""
    from starsql.train.data import DataArguments, prepare_datasets

    train, _, _ = prepare_datasets(DataArguments(dataset_name=str(DATA), eval_fraction=0), tokenizer, SEQ)
    return train


def example_ids(tokenizer, rows) -> list[list[int]]:
    texts = [p + c for p, c in zip(rows["prompt"], rows["completion"])]
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def sft_dataset(tokenizer, tokens_needed: int):
    """Enough rows for the run: the 400 rows repeated (after dedup, so repeats survive), packing stays real."""
    from datasets import concatenate_datasets

    rows = training_rows(tokenizer)
    per_pass = sum(map(len, example_ids(tokenizer, rows)))
    return concatenate_datasets([rows] * math.ceil(1.3 * tokens_needed / per_pass))


def plain_batches(tokenizer, mb: int, steps: int) -> torch.Tensor:
    """[steps, mb, SEQ] token ids: tokenized examples concatenated and cut into SEQ-token rows."""
    ids = [t for example in example_ids(tokenizer, training_rows(tokenizer)) for t in example]
    need = steps * mb * SEQ
    ids = ids * math.ceil(need / len(ids))
    return torch.tensor(ids[:need]).view(steps, mb, SEQ)


# ---------------------------------------------------------------- the two training paths


def run_plain(cfg: dict, args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from starsql.train.model import compute_dtype

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    steps = args.warmup + args.steps
    batches = plain_batches(tokenizer, cfg["mb"], steps)
    set_seed(0)
    started = time.perf_counter()
    dtype = compute_dtype()
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, quantization_config=bnb_4bit_config(), dtype=dtype, attn_implementation="sdpa",
        device_map={"": 0} if torch.cuda.is_available() else None,
    )  # fmt: skip
    model.config.use_cache = False
    if cfg["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen 4-bit inputs: checkpointed blocks need a grad path
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    load_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    losses, marks = [], []
    sync()
    marks.append(time.perf_counter())
    for batch in batches:
        batch = batch.to(device())
        with torch.autocast(device().type, dtype=dtype, enabled=torch.cuda.is_available()):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # read after the loop: .item() here would add a second sync
        sync()  # one sync per step, as the trainer's per-step logging does
        marks.append(time.perf_counter())
    elapsed = marks[-1] - marks[args.warmup]
    tokens = args.steps * cfg["mb"] * SEQ
    return dict(
        tokens_per_s=round(tokens / elapsed, 1), step_s=round(elapsed / args.steps, 3), tokens_timed=tokens,
        timed_steps=args.steps, losses=[round(float(x), 4) for x in losses], load_s=round(load_s, 1),
        step_times_s=[round(b - a, 3) for a, b in zip(marks, marks[1:])], attn=model.config._attn_implementation,
    )  # fmt: skip


def run_sft(cfg: dict, args) -> dict:
    from unittest import mock

    import torch._inductor.config as inductor_config
    from transformers import TrainerCallback, set_seed

    from starsql.train.model import ModelArguments, load_model, load_tokenizer, lora_config
    from starsql.train.sft import TrainingConfig, trainer_class

    class StepTimer(TrainerCallback):
        """Time and tokens between the end of step `warmup` and the end of the last step."""

        def __init__(self, warmup: int):
            self.warmup, self.start, self.end, self.marks = warmup, None, None, []

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            mark = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)
            self.marks.append(mark[0])
            if state.global_step == self.warmup:
                self.start = mark
            elif state.global_step > self.warmup:
                self.end = mark

    class KernelProfile(TrainerCallback):
        """Where a step's GPU time goes: torch.profiler over the last 2 warm-up steps (so the timed steps run
        unprofiled), the top kernels by GPU time."""

        def __init__(self, warmup: int, steps: int = 2, top: int = 25):
            self.warmup, self.steps, self.n, self.profiler, self.top, self.idle = warmup, steps, top, None, None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == self.warmup - self.steps and self.profiler is None:
                activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * torch.cuda.is_available()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and self.top is None and state.global_step == self.warmup:
                sync()
                self.profiler.__exit__(None, None, None)
                events = self.profiler.key_averages()
                cuda = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
                key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
                chosen = sorted(cuda or events, key=key, reverse=True)
                total = sum(key(e) for e in chosen) or 1
                self.top = [{"kernel": e.key[:120], "ms_per_step": round(key(e) / 1e3 / self.steps, 2),
                             "share": round(key(e) / total, 4), "calls_per_step": e.count // self.steps}
                            for e in chosen[: self.n]]  # fmt: skip
                if cuda:
                    self.idle = profiled_idle(self.profiler, self.steps)

    class FirstStepRecord(TrainerCallback):
        """The first optimizer step's gradients (after clipping: what AdamW sees) and the change it makes to each
        trainable weight, saved to `path` for step1_comparison."""

        def __init__(self, path: str):
            self.path, self.grads, self.before = path, None, None

        def trainable(self, model):
            # Regional compilation wraps modules (_orig_mod): names as eager has them, so runs compare.
            return {n.replace("._orig_mod", ""): p for n, p in model.named_parameters() if p.requires_grad}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                params = self.trainable(model)
                self.grads = {n: p.grad.detach().float().cpu() for n, p in params.items() if p.grad is not None}
                self.before = {n: p.detach().float().cpu() for n, p in params.items()}

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0 and state.is_world_process_zero:  # one file, however many processes
                updates = {n: p.detach().float().cpu() - self.before[n] for n, p in self.trainable(model).items()}
                torch.save({"grads": self.grads, "updates": updates, "lr": args.learning_rate}, self.path)

    model_args = ModelArguments(model_name_or_path=args.model_dir, attn_implementation=cfg.get("attn"), dtype=cfg.get("dtype"),
                                half_precision_layer_norm=cfg.get("half_ln", True),
                                **{k.removeprefix("margs."): v for k, v in cfg.items() if k.startswith("margs.")})
    tokenizer = load_tokenizer(model_args)
    steps = args.warmup + args.steps
    dataset = sft_dataset(tokenizer, steps * cfg["mb"] * SEQ * cfg.get("procs", 1))
    set_seed(0)
    started = time.perf_counter()
    model = load_model(model_args)
    if cfg.get("cast_params"):  # floating weights outside the 4-bit layers to bf16, after loading
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
    for key, value in cfg.items():  # model.FIELD: a config value, on the config and on the modules that copied it
        if key.startswith("model."):
            field = key.removeprefix("model.")
            setattr(model.config, field, value)
            for module in model.modules():
                if hasattr(module, field):
                    setattr(module, field, value)
    training_args = TrainingConfig(**dict(
        output_dir=tempfile.mkdtemp(prefix="bench-sft-"),
        per_device_train_batch_size=cfg["mb"],
        gradient_accumulation_steps=1,
        gradient_checkpointing=cfg["ckpt"],
        max_steps=steps,
        # Constant LR, as in the plain loop: the loss moves from step 2 on, so the loss check means something.
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_steps=1,
        include_num_input_tokens_seen=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_liger_kernel=bool(cfg.get("liger")),
        torch_compile=bool(cfg.get("compile")),
        compile_regions=bool(cfg.get("regional")),  # train_sft.py's --compile_regions
        fused_lora=cfg.get("fused_lora", True),  # train_sft.py's --fused_lora
        seed=0,
    ) | {key.removeprefix("args."): value for key, value in cfg.items() if key.startswith("args.")})  # args.FIELD wins
    timer = StepTimer(args.warmup)
    # The profiler stops before the timer's first mark (callbacks run in order).
    callbacks = ([KernelProfile(args.warmup)] if cfg.get("profile") else []) + [timer]
    callbacks += [FirstStepRecord(cfg["step1_file"])] if cfg.get("step1_file") else []
    peft_config = lora_config(model_args)
    if "lora_init" in cfg:  # false: B random too (PEFT's init_lora_weights), so the adapter acts from the first step
        peft_config.init_lora_weights = cfg["lora_init"]
    # As starsql.train.sft.run trains: compiled layers round and drop out as eager ones (eager_numerics), unless
    # the config's inductor.FIELD values say otherwise: they apply inside each training step, where layers compile.
    inductor = {k.removeprefix("inductor."): v for k, v in cfg.items() if k.startswith("inductor.")}

    class BenchTrainer(trainer_class(training_args)):
        def training_step(self, *args, **kwargs):
            with inductor_config.patch(**inductor):
                return super().training_step(*args, **kwargs)

    # `dynamic`: accelerate's dynamic-shape setting from the first step, which it reads from the environment when
    # the trainer creates its TorchDynamoPlugin (unset: torch.compile recompiles once lengths vary).
    dynamic = {} if cfg.get("dynamic") is None else {"ACCELERATE_DYNAMO_USE_DYNAMIC": str(int(cfg["dynamic"]))}
    set_seed(0)  # the LoRA init happens inside SFTTrainer: same seed there for every configuration
    with mock.patch.dict(os.environ, dynamic):  # as starsql.train.sft.run builds its trainer
        trainer = BenchTrainer(model=model, args=training_args, peft_config=peft_config, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=callbacks)  # fmt: skip
    load_s = time.perf_counter() - started
    trainer.train()
    if timer.start is None or timer.end is None:
        raise RuntimeError(f"Training stopped before step {args.warmup + 1}: too few packed rows?")
    elapsed, tokens = timer.end[0] - timer.start[0], timer.end[1] - timer.start[1]
    timed = timer.end[2] - timer.start[2]
    losses_exact = [e["loss"] for e in trainer.state.log_history if "loss" in e]  # to the bit: same-computation checks
    losses = [round(loss, 4) for loss in losses_exact]
    grad_norms = [round(float(e["grad_norm"]), 4) for e in trainer.state.log_history if "grad_norm" in e]
    seen = [0] + [e["num_input_tokens_seen"] for e in trainer.state.log_history if "loss" in e]
    step_tokens = [int(b - a) for a, b in zip(seen, seen[1:])]  # tokens of each step's packed rows
    return dict(
        tokens_per_s=round(tokens / elapsed, 1), step_s=round(elapsed / timed, 3), tokens_timed=int(tokens),
        timed_steps=timed, losses=losses, losses_exact=losses_exact, grad_norms=grad_norms, step_tokens=step_tokens, load_s=round(load_s, 1), attn=model.config._attn_implementation,
        step_times_s=[round(b - a, 3) for a, b in zip(timer.marks, timer.marks[1:])],
        packing_strategy=training_args.packing_strategy, padding_free=trainer.padding_free,
        **({"top_kernels": callbacks[0].top, "gpu_idle": callbacks[0].idle} if cfg.get("profile") else {}),
    )  # fmt: skip


def profiled_idle(profiler, steps: int) -> dict:
    """gpu_idle of a finished torch.profiler run over `steps` steps."""
    with tempfile.TemporaryDirectory() as folder:
        profiler.export_chrome_trace(f"{folder}/trace.json")
        return gpu_idle(json.loads(Path(f"{folder}/trace.json").read_text()), steps)


def gpu_idle(trace: dict, steps: int, min_gap_us: float = 20, top: int = 15, largest: int = 8) -> dict:
    """Where the GPU waits, from a torch.profiler chrome trace: the time between its kernels and copies in the
    profiled steps, and, for each gap of at least min_gap_us, what the CPU thread that launched the next kernel
    was running when the gap began (outermost op > innermost op). A gap whose next kernel was launched before
    it began waited on something else (a dependency across streams); "launched early" counts those. The
    `largest` longest gaps are listed with the whole op stack and the kernels on either side."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not gpu:
        return {}
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    ops_by_thread = {}
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation", "python_function"):
            ops_by_thread.setdefault(e["tid"], []).append(e)
    busy_until, window = gpu[0]["ts"] + gpu[0]["dur"], gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
    idle_us, by_cause, counts, early, longest = 0.0, {}, {}, 0.0, []
    previous = gpu[0]
    for kernel in gpu[1:]:
        gap = kernel["ts"] - busy_until
        if gap > 0:
            idle_us += gap
        if gap >= min_gap_us:
            launch = launches.get(kernel.get("args", {}).get("correlation"))
            if launch is None or launch["ts"] <= busy_until:
                early += gap
            else:
                at = busy_until  # what the launching thread was doing when the GPU ran dry
                running = sorted((op for op in ops_by_thread.get(launch["tid"], []) if op["ts"] <= at <= op["ts"] + op["dur"]),
                                 key=lambda op: op["ts"])  # fmt: skip
                cause = f"{running[0]['name'][:60]} > {running[-1]['name'][:60]}" if running else "(no op)"
                by_cause[cause] = by_cause.get(cause, 0.0) + gap
                counts[cause] = counts.get(cause, 0) + 1
                longest.append({"us": round(gap, 1), "thread": launch["tid"], "stack": [op["name"][:80] for op in running],
                                "before": previous.get("name", "")[:60], "after": kernel.get("name", "")[:60]})  # fmt: skip
        if kernel["ts"] + kernel["dur"] > busy_until:
            busy_until, previous = kernel["ts"] + kernel["dur"], kernel
    ranked = sorted(by_cause.items(), key=lambda item: -item[1])[:top]
    return {"window_ms_per_step": round(window / 1e3 / steps, 2), "idle_ms_per_step": round(idle_us / 1e3 / steps, 2),
            "launched_early_ms_per_step": round(early / 1e3 / steps, 2),
            "gaps": [{"cause": cause, "ms_per_step": round(us / 1e3 / steps, 2), "gaps_per_step": counts[cause] / steps}
                     for cause, us in ranked],
            "largest": sorted(longest, key=lambda gap: -gap["us"])[:largest]}  # fmt: skip


def run_config(cfg: dict, args) -> dict:
    """One configuration, OOM and errors turned into fields; memory freed afterwards."""
    free_memory()
    started = time.perf_counter()
    result = {}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's prints stay off the JSON lines
            result = (run_plain if cfg["path"] == "plain" else run_sft)(cfg, args)
    except torch.cuda.OutOfMemoryError as error:
        result = {"oom": True, "error": str(error).splitlines()[0][:300]}
    except Exception as error:  # noqa: BLE001 -- a failing candidate is a result, not the end of the run
        result = {"error": f"{type(error).__name__}: {error}"[:1000]}
        if "out of memory" in str(error).lower():  # some kernels raise a plain RuntimeError
            result["oom"] = True
    if torch.cuda.is_available():
        result["total_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    result.update(card=card(), peak_mem_gib=peak_gib(), peak_reserved_gib=peak_reserved_gib())
    result["wall_s"] = round(time.perf_counter() - started, 1)
    free_memory()
    return result


# ---------------------------------------------------------------- orchestration


def static_status(cfg: dict, args) -> dict | None:
    """A result known without running: unsupported Liger, or a compile-heavy config skipped on CPU."""
    if cfg.get("liger"):
        try:
            import liger_kernel
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
        except ImportError as error:
            return {"unsupported": f"liger_kernel not importable ({error})"}
        if "starcoder2" not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            version = getattr(liger_kernel, "__version__", None) or _version("liger-kernel")
            return {"unsupported": f"liger_kernel {version} has no starcoder2 patch (apply_liger_kernel_to_starcoder2)"}
        if not torch.cuda.is_available():
            return {"skipped": "Liger's Triton kernels need a GPU"}
    if cfg.get("procs", 1) > max(len(_visible_gpus()), 1 if args.smoke else 0):
        return {"skipped": f"needs {cfg['procs']} GPUs, {len(_visible_gpus())} visible"}
    if cfg.get("heavy") and args.smoke and cfg["name"] not in args.only_names:
        return {"skipped": "compiles kernels: slow on CPU (name it with --only to run it)"}
    return None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def execute(cfg: dict, args, timeout: float) -> dict:
    if args.mode == "inprocess":
        return run_config(cfg, args)
    result_file = Path(tempfile.mkstemp(prefix="bench-result-", suffix=".json")[1])
    argv = [sys.executable, __file__, "--_child", json.dumps(cfg), "--_result", str(result_file)]
    if cfg.get("procs", 1) > 1:  # DDP over GPUs, the way users run train_sft.py on several
        argv[1:1] = ["-m", "accelerate.commands.launch", "--num_processes", str(cfg["procs"]), "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    argv += ["--model_dir", args.model_dir, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    argv += ["--smoke"] * args.smoke
    # Exactly the GPUs the config uses: one process that sees two would be wrapped in nn.DataParallel.
    visible = {} if args.smoke else {"CUDA_VISIBLE_DEVICES": ",".join(_visible_gpus()[: cfg.get("procs", 1)])}
    code, tail = run_child(argv, args.log_dir / f"{cfg['name']}.log", timeout, env={**visible, **cfg.get("env", {})})
    if result_file.stat().st_size:
        return json.loads(result_file.read_text())
    return {"error": f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}", "log_tail": tail}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="Also append the JSON lines to this file.")
    parser.add_argument("--model_dir", default="/tmp/sc2-3b-random", help="The random model; built if missing.")
    parser.add_argument("--smoke", action="store_true", help="Tiny model, few steps: a CPU wiring check.")
    parser.add_argument("--only", default="", help="Comma-separated config names (+ the baseline and their loss refs).")
    parser.add_argument("--add", action="append", default=[], help="Extra config 'NAME:key=value,...'.")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps (default 3, smoke 1).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps (default 8, smoke 2).")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="Start no config after this many seconds (default 450; no limit in --smoke).")  # fmt: skip
    parser.add_argument("--mode", choices=["subprocess", "inprocess"], default=None)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 8)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args._child:  # one configuration, in its own process (or one per GPU, under accelerate launch)
        from accelerate import PartialState

        result = run_config(json.loads(args._child), args)
        if PartialState().is_main_process:
            Path(args._result).write_text(json.dumps(result))
        return 0

    if args.smoke and args.model_dir == parser.get_default("model_dir"):
        args.model_dir = "/tmp/sc2-smoke-random"
    args.mode = args.mode or ("inprocess" if args.smoke else "subprocess")
    args.log_dir = Path((args.out + ".logs") if args.out else tempfile.mkdtemp(prefix="bench-train-logs-"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    added = [parse_add(spec) for spec in args.add]
    configs = CONFIGS + added
    args.only_names = set(filter(None, args.only.split(","))) | {c["name"] for c in added}
    unknown = args.only_names - {c["name"] for c in configs}
    if unknown:
        parser.error(f"unknown config(s) {sorted(unknown)}; known: {[c['name'] for c in configs]}")
    if args.only:  # the named configs, the baseline, and the loss references they are checked against
        chosen = [c for c in configs if c["name"] in args.only_names]
        wanted = args.only_names | {BASELINE} | {c.get("loss_ref", LOSS_REF[c["path"]]) for c in chosen}
        wanted |= {c["fallback"] for c in chosen if c.get("fallback")}  # mb32's OOM fallback scales from mb16
        configs = [c for c in configs if c["name"] in wanted]
    if args.smoke:  # same shapes of run, a quarter of the rows per step
        configs = [dict(c, mb=max(1, c["mb"] // 4)) for c in configs]

    started = time.perf_counter()
    if args.mode == "subprocess":  # built in a child too: this process never holds GPU memory
        code, tail = run_child([sys.executable, str(Path(__file__).with_name("common.py")), args.model_dir]
                               + ["--smoke"] * args.smoke, args.log_dir / "build.log", timeout=360)  # fmt: skip
        if code != 0:
            sys.exit(f"Building the model failed:\n{tail}")
    else:
        ensure_model(args.model_dir, smoke=args.smoke)
    args.budget_s = args.budget_s or (math.inf if args.smoke else 450)
    deadline = started + args.budget_s

    packages = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "liger-kernel")
    versions = {package: _version(package) for package in packages}
    gpu = card() if args.mode == "inprocess" else _card_without_cuda_context()
    records, by_name = [], {}
    queue = list(configs)
    while queue:
        cfg = queue.pop(0)
        remaining = deadline - time.perf_counter()
        result = static_status(cfg, args)
        if result is None and remaining < (120 if cfg.get("heavy") else 45):
            result = {"skipped": f"time budget (--budget_s {args.budget_s:.0f}) spent; run it alone with --only"}
        if result is None:
            timeout = cfg.get("timeout", DEFAULT_TIMEOUT) * (3 if args.smoke else 1)
            if cfg.get("step1"):
                cfg = dict(cfg, step1_file=str(args.log_dir / f"{cfg['name']}-step1.pt"))
            result = execute(cfg, args, timeout=min(timeout, remaining))
            reference = by_name.get(cfg.get("step1_ref"), {}).get("step1_file")
            if cfg.get("step1_file") and reference and Path(cfg["step1_file"]).is_file() and Path(reference).is_file():
                result["step1_vs_ref"] = step1_comparison(reference, cfg["step1_file"])
            if cfg.get("step1_file"):
                result["step1_file"] = cfg["step1_file"]
        record = describe(cfg, result, by_name, gpu=gpu, warmup=args.warmup, versions=versions)
        emit(record, args.out)
        records.append(record)
        by_name[cfg["name"]] = record
        mb = fitting_micro_batch(cfg, record, by_name.get(cfg.get("fallback")))
        if mb:
            queue.insert(0, dict(cfg, name=f"{cfg['path']}-mb{mb}", mb=mb, fallback=None))

    check = loss_check(records)
    if check:
        emit({"card": gpu, **check}, args.out)
    print()
    print(table(records, ["config", "micro_batch", "tokens_per_s", "ratio_to_baseline", "step_s", "peak_mem_gib",
                          "loss_equivalent", "load_s", "wall_s"]))  # fmt: skip
    for r in records:
        note = r.get("error") or r.get("skipped") or r.get("unsupported")
        if note:
            print(f"  {r['config']}: {note.splitlines()[0][:200]}")
    if check:
        print(f"Loss check: {check['best']} vs {check['reference']}: max rel diff {check['max_rel_diff_first5']} "
              f"over the first 5 steps -> equivalent={check['equivalent']}")  # fmt: skip
    logs = f"; per-config logs in {args.log_dir}" if args.mode == "subprocess" else ""
    print(f"Total {time.perf_counter() - started:.0f} s on {gpu}{logs}")
    return 0


def describe(cfg: dict, result: dict, by_name: dict, **extra) -> dict:
    """The JSON line of one configuration: its settings, its result, the ratio to the baseline and, for a
    config that trains on the same rows as its loss reference, how far its losses are from the reference's."""
    record = {"card": extra["gpu"], "config": cfg["name"], "path": cfg["path"], "micro_batch": cfg["mb"],
              "seq_len": SEQ, "gradient_checkpointing": cfg["ckpt"], "attn_requested": cfg.get("attn"),
              "liger": bool(cfg.get("liger")), "torch_compile": bool(cfg.get("compile")),
              "compile_regions": bool(cfg.get("regional")), "dynamic": cfg.get("dynamic"),
              # What ran: the trainer fuses LoRA layers only for eager ones.
              "fused_lora": cfg.get("fused_lora", True) and not cfg.get("compile") if cfg["path"] == "sft" else None,
              "env": cfg.get("env"),
              "half_precision_layer_norm": cfg.get("half_ln", True) if cfg["path"] == "sft" else False,
              "dtype": cfg.get("dtype"), "cast_params": bool(cfg.get("cast_params")),
              "gpus": cfg.get("procs", 1),
              "overrides": {k: v for k, v in cfg.items() if k.startswith(("args.", "model.", "margs."))},
              "inductor": {k: v for k, v in cfg.items() if k.startswith("inductor.")}, "lora_init": cfg.get("lora_init"),
              "warmup_steps": extra["warmup"], **result}  # fmt: skip
    if cfg.get("mem_limit_gib") and record.get("peak_reserved_gib") is not None:
        record["under_mem_limit"] = record["peak_reserved_gib"] <= cfg["mem_limit_gib"]
    record["ratio_to_baseline"] = ratio(record.get("tokens_per_s"), by_name.get(BASELINE, {}).get("tokens_per_s"))
    record["baseline"] = BASELINE
    reference = by_name.get(cfg.get("loss_ref", LOSS_REF[cfg["path"]]))
    if reference and reference.get("losses") and record.get("losses") and same_rows(record, reference):
        diff = max_rel_diff(record["losses"], reference["losses"])
        record.update(loss_ref=reference["config"], loss_max_rel_diff_first5=diff,
                      loss_equivalent=diff is not None and diff <= 1e-2)  # fmt: skip
    record["versions"] = extra["versions"]
    return record


def step1_comparison(reference_file: str, candidate_file: str) -> dict:
    """How two runs' first optimizer steps differ, for LoRA's A and B matrices apart: gradients (relative L2
    distance, entries zero in one run only, entries of opposite sign and how small those are) and the weight
    changes AdamW made of them (its first step moves each weight by about the learning rate times the sign of
    the gradient: how many weights moved differently by more than half the learning rate)."""
    ref, cand = torch.load(reference_file), torch.load(candidate_file)
    lr = ref["lr"]
    report = {}
    for kind in ("lora_A", "lora_B"):
        names = sorted(n for n in ref["grads"] if f".{kind}." in n and n in cand["grads"])
        if not names:
            continue
        g_ref = torch.cat([ref["grads"][n].flatten() for n in names])
        g_cand = torch.cat([cand["grads"][n].flatten() for n in names])
        u_ref = torch.cat([ref["updates"][n].flatten() for n in names])
        u_cand = torch.cat([cand["updates"][n].flatten() for n in names])
        both = (g_ref != 0) & (g_cand != 0)
        flipped = both & (g_ref.sign() != g_cand.sign())
        scale = g_ref.abs().median().item()
        report[kind] = {
            "tensors": len(names), "entries": g_ref.numel(),
            "grad_nonzero": [int((g_ref != 0).sum()), int((g_cand != 0).sum())],
            "grad_rel_l2_diff": round(((g_cand - g_ref).norm() / g_ref.norm().clamp_min(1e-30)).item(), 6),
            "grad_zero_in_one_only": int(((g_ref == 0) != (g_cand == 0)).sum()),
            "grad_sign_flipped": int(flipped.sum()),
            "flipped_abs_grad_over_median": round((g_ref[flipped].abs().max().item() / scale) if flipped.any() and scale else 0.0, 6),
            "update_mean_abs_over_lr": [round(u_ref.abs().mean().item() / lr, 4), round(u_cand.abs().mean().item() / lr, 4)],
            "update_differs_by_half_lr": int(((u_cand - u_ref).abs() > lr / 2).sum()),
            "update_rel_l2_diff": round(((u_cand - u_ref).norm() / u_ref.norm().clamp_min(1e-30)).item(), 6),
        }
    return report


def fitting_micro_batch(cfg: dict, record: dict, smaller: dict | None) -> int | None:
    """After an OOM: the micro-batch that should fit in 90% of the card, scaled from a smaller run's peak
    (all of that peak counted as per-row activations, so the estimate errs small), a multiple of 4."""
    if not record.get("oom") or not smaller or not smaller.get("peak_mem_gib") or not record.get("total_mem_gib"):
        return None
    per_row = smaller["peak_mem_gib"] / smaller["micro_batch"]
    mb = min(int(0.9 * record["total_mem_gib"] / per_row) // 4 * 4, cfg["mb"] - 4)
    return mb if mb > smaller["micro_batch"] else None


def same_rows(a: dict, b: dict) -> bool:
    """Whether two configs compute the same thing on the same rows in the same order (so their losses agree)."""
    return (a["micro_batch"], a.get("overrides"), a.get("gpus", 1)) == (b["micro_batch"], b.get("overrides"), b.get("gpus", 1))


def loss_check(records: list[dict]) -> dict | None:
    """The fastest SFTTrainer candidate against its loss reference (mb16+checkpointing, or the SDPA run with the
    same model overrides): same rows, same seed, so the same losses. A candidate of another micro-batch sees other
    rows per step and has no reference; then the fastest one that has one is checked (and both are named)."""
    ran = [r for r in records if r["path"] == "sft" and r.get("tokens_per_s")]
    checked = [r for r in ran if r.get("loss_ref")]
    if not checked:
        return None
    best = max(checked, key=lambda r: r["tokens_per_s"])
    reference = next(r for r in records if r["config"] == best["loss_ref"])
    return {
        "config": "loss-check", "best": best["config"], "reference": reference["config"],
        "fastest_overall": max(ran, key=lambda r: r["tokens_per_s"])["config"],
        "best_losses": best["losses"][:5], "reference_losses": reference["losses"][:5],
        "max_rel_diff_first5": best["loss_max_rel_diff_first5"], "equivalent": best["loss_equivalent"],
        "tolerance": 1e-2,
    }  # fmt: skip


def _gpu_count() -> int:
    """GPUs on this machine, via nvidia-smi (no CUDA context in the parent)."""
    import subprocess

    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def _visible_gpus() -> list[str]:
    """The GPUs this run may use: CUDA_VISIBLE_DEVICES when set, else all of them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [device for device in listed.split(",") if device.strip()]
    return [str(index) for index in range(_gpu_count())]


def _card_without_cuda_context() -> str:
    """The GPU's name via nvidia-smi, so the parent process creates no CUDA context (children measure)."""
    import subprocess

    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")  # fmt: skip
        return names[0].strip() or card()
    except (OSError, subprocess.SubprocessError):
        return card()


if __name__ == "__main__":
    sys.exit(main())
