"""Wall time of a whole training recipe through train_sft.py, compile and evaluations included: what a user
waits for. One JSON line per variant: the card, the trainer's wall time, the first two steps (where
flex_attention and torch.compile compile), the time and tokens/s of the steps after the first logged one
("steady_*": the evaluations and checkpoint saves that end some of those steps included; tokens as TRL's
logs count them), the final losses; with --sync_steps the host-GPU syncs of some steps, with
--profile_steps where the GPU waits in some steps.

    python3 bench/recipe_time.py --model_dir /tmp/sc2-3b-random --data train.json --out $OUT/recipe.jsonl \
        --variant eager: --variant compiled:--compile_regions,true

Each variant runs train_sft.py's main() in its own process with empty Inductor and Triton caches (a fresh
machine, as an `hf jobs` run gets). On a GPU with the random model (bench/common.py builds it); on a CPU
with tiny-starcoder2 and configs/tiny.yaml it checks its own wiring.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(argv: list[str], result: str, sync_steps: str | None = None, profile_steps: str | None = None) -> int:
    """train_sft.main(argv), each optimizer step's end marked on the GPU's stream (a CUDA event, no sync: the
    timer lets Python run ahead of the GPU as an untimed run does). sync_steps "A-B": list every host-GPU sync
    of steps A to B with its Python stack (torch.cuda.set_sync_debug_mode). profile_steps "A-B": where the GPU
    waits in steps A to B (torch.profiler, train_throughput.gpu_idle). A --trl_step argument: the training step
    as TRL and Trainer take it, with their per-step syncs: --sync_free_step false (TRL's compute_loss), Trainer's
    NaN check of the loss and batch copies that wait."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import TrainerCallback

    import starsql.train.sft as sft
    import train_sft
    from train_throughput import profiled_idle

    cuda = torch.cuda.is_available()
    marks, syncs, idle = [], Counter(), {}

    def mark():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def span(steps: str | None) -> tuple[int, int]:
        first, _, last = (steps or "0-0").partition("-")
        return int(first), int(last or first)

    sync_first, sync_last = span(sync_steps)
    profile_first, profile_last = span(profile_steps)
    show_warning = warnings.showwarning

    def record_sync(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):
            return show_warning(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in Path(f.filename).name][-5:]
        syncs[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))] += 1

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(mark())

        def on_step_begin(self, args, state, control, **kwargs):
            step = state.global_step + 1
            if cuda and step == sync_first:
                self.filters = warnings.filters[:]
                warnings.simplefilter("always")  # every sync, not the first one per line
                warnings.showwarning = record_sync
                torch.cuda.set_sync_debug_mode("warn")
            if step == profile_first:
                activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(mark())
            if cuda and state.global_step == sync_last:
                torch.cuda.set_sync_debug_mode(0)
                warnings.showwarning, warnings.filters[:] = show_warning, self.filters
            if state.global_step == profile_last:
                self.profiler.__exit__(None, None, None)
                idle.update(profiled_idle(self.profiler, profile_last - profile_first + 1))

    chosen, trainers = sft.trainer_class, []
    if "--trl_step" in argv:  # flags of train_sft.py (a later one wins); blocking copies through a config file
        blocking = Path(tempfile.mkstemp(prefix="accelerator-", suffix=".json")[1])
        blocking.write_text(json.dumps({"non_blocking": False}))
        argv = [arg for arg in argv if arg != "--trl_step"]
        argv += ["--sync_free_step", "false", "--logging_nan_inf_filter", "true", "--accelerator_config", str(blocking)]

    def timed_trainer(training_args):  # the trainer run() would build, with the step timer as one more callback
        class Timed(chosen(training_args)):
            def __init__(self, *args, callbacks=None, **kwargs):
                super().__init__(*args, callbacks=[*(callbacks or []), StepTimes()], **kwargs)
                trainers.append(self)

        return Timed

    sft.trainer_class = timed_trainer
    started = time.perf_counter()
    code = train_sft.main(argv)
    if cuda:
        torch.cuda.synchronize()
        steps = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    else:
        steps = [b - a for a, b in zip(marks, marks[1:])]
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    summary = json.loads((output_dir / "run_summary.json").read_text())
    # Tokens as TRL's logs count them (no per-step count: that would sync). Steady: after the first logged step.
    logged = [(e["step"], e["num_tokens"]) for e in trainers[0].state.log_history if "loss" in e and "num_tokens" in e]
    first_logged, last_logged = (logged[0], logged[-1]) if len(logged) > 1 else ((0, 0), (0, 0))
    steady_s = sum(steps[first_logged[0]:last_logged[0]])
    steady_tokens = last_logged[1] - first_logged[1]
    Path(result).write_text(json.dumps({
        "exit_code": code, "process_s": round(time.perf_counter() - started, 1),
        "train_wall_s": round(summary["wall_time_s"], 1), "steps": len(steps), "tokens": last_logged[1],
        "first_two_steps_s": [round(s, 1) for s in steps[:2]], "steady_from_step": first_logged[0] + 1,
        "steady_to_step": last_logged[0], "steady_steps_s": round(steady_s, 1),
        "steady_tokens_per_s": round(steady_tokens / steady_s, 1) if steady_s else None,
        "slowest_steady_steps_s": sorted(round(s, 2) for s in steps[2:])[-5:],
        "train_loss_final": summary["train_loss_final"], "eval_loss_final": summary["eval_loss_final"],
        **({"syncs_per_step": {site: n / (sync_last - sync_first + 1) for site, n in syncs.most_common()}}
           if cuda and sync_steps else {}),
        **({"gpu_idle": idle} if profile_steps else {}),
    }))  # fmt: skip
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--data", required=True, help="sql-create-context rows (JSON or JSONL).")
    parser.add_argument("--config", default=str(ROOT / "configs" / "starcoder2-3b-sql-fast.yaml"))
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME:ARG,VALUE,... extra train_sft.py arguments, e.g. compiled:--compile_regions,true")
    parser.add_argument("--out", help="Also append the JSON lines to this file.")
    parser.add_argument("--timeout", type=float, default=420, help="Seconds per variant.")
    parser.add_argument("--cache_dir", help="Inductor and Triton caches shared by the variants (default: each "
                                            "variant starts from empty ones, as a fresh machine does).")
    parser.add_argument("--sync_steps", help="A-B: list the host-GPU syncs of steps A to B (GPU only).")
    parser.add_argument("--profile_steps", help="A-B: where the GPU waits in steps A to B (torch.profiler).")
    args = parser.parse_args()
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    for spec in args.variant:
        name, _, extra = spec.partition(":")
        work = Path(tempfile.mkdtemp(prefix=f"recipe-{name}-"))
        result = work / "result.json"
        argv = ["--config", args.config, "--model_name_or_path", args.model_dir, "--dataset_name", args.data,
                "--output_dir", str(work / "out"), "--disable_tqdm", "true", *filter(None, extra.split(","))]
        cache = Path(args.cache_dir) if args.cache_dir else work
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
        code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import recipe_time; " \
               f"sys.exit(recipe_time.child(sys.argv[2:], sys.argv[1], {args.sync_steps!r}, {args.profile_steps!r}))"  # fmt: skip
        try:
            done = subprocess.run([sys.executable, "-c", code, str(result), *argv], env=env, timeout=args.timeout,
                                  capture_output=True, text=True)  # fmt: skip
            record = json.loads(result.read_text()) if result.is_file() else {"error": done.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            record = {"error": f"timed out after {args.timeout:.0f} s"}
        line = json.dumps({"card": card, "variant": name, "args": extra, **record})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as out:
                out.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
