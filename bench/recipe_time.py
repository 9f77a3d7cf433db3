"""Wall time of a whole training recipe through train_sft.py, compile and evaluations included: what a user
waits for. One JSON line per variant: the card, the trainer's wall time, the first two steps (where
flex_attention and torch.compile compile), the later steps' time and tokens/s ("steady_*": the
evaluations and checkpoint saves that end some of those steps included), the final losses.

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(argv: list[str], result: str) -> int:
    """train_sft.main(argv) with a callback timing every optimizer step (CUDA synchronised)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import TrainerCallback

    import starsql.train
    import train_sft

    marks, tokens = [], []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            marks.append(time.perf_counter())
            tokens.append(state.num_input_tokens_seen)

    build = starsql.train.build_trainer

    def with_timer(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), StepTimes()]
        return build(*args, **kwargs)

    starsql.train.build_trainer = with_timer
    started = time.perf_counter()
    code = train_sft.main(argv)
    steps = [b - a for a, b in zip(marks, marks[1:])]
    steady_s, steady_tokens = sum(steps[2:]), tokens[-1] - tokens[1] if len(tokens) > 2 else 0
    summary = json.loads((Path(argv[argv.index("--output_dir") + 1]) / "run_summary.json").read_text())
    Path(result).write_text(json.dumps({
        "exit_code": code, "process_s": round(time.perf_counter() - started, 1),
        "train_wall_s": round(summary["wall_time_s"], 1), "steps": len(steps), "tokens": tokens[-1] if tokens else 0,
        "first_two_steps_s": [round(s, 1) for s in steps[:2]], "steady_steps_s": round(steady_s, 1),
        "steady_tokens_per_s": round(steady_tokens / steady_s, 1) if steady_s else None,
        "slowest_steady_steps_s": sorted(round(s, 2) for s in steps[2:])[-5:],
        "train_loss_final": summary["train_loss_final"], "eval_loss_final": summary["eval_loss_final"],
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
    args = parser.parse_args()
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    for spec in args.variant:
        name, _, extra = spec.partition(":")
        work = Path(tempfile.mkdtemp(prefix=f"recipe-{name}-"))
        result = work / "result.json"
        argv = ["--config", args.config, "--model_name_or_path", args.model_dir, "--dataset_name", args.data,
                "--output_dir", str(work / "out"), "--include_num_input_tokens_seen", "true", "--disable_tqdm", "true",
                *filter(None, extra.split(","))]  # fmt: skip
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"), TRITON_CACHE_DIR=str(work / "triton"))
        code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import recipe_time; " \
               f"sys.exit(recipe_time.child(sys.argv[2:], sys.argv[1]))"  # fmt: skip
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
