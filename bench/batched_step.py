"""Where the batched decoder's time goes, without HTTP: its steps, its prefills, its engine loop.

    python3 bench/batched_step.py --out $OUT/batched_step.json          # GPU: StarCoder2-3B's shape, random weights
    python3 bench/batched_step.py --smoke --out /tmp/batched_step.json  # CPU, tiny model: wiring

The model is prepared as starsql.serve.fast.build prepares it (q/k/v fused, the one-row and rows kernels), then:
- steps: a BatchedDecoder (--compile) of 2,048-position slots, with the rows kernel or not (--rows_kernel), each of
  its steps (1-16 rows over 256-2,048 positions) timed with every row at position --position (or the step's last):
  GPU time a step (CUDA events over --steps back-to-back replays) and the engine's old pattern (replay, wait, tokens
  to the host: `host_ms`).
- profile: the GPU kernels of one eager 16-row step over the whole slots, the top ones by time.
- prefill_profile: the same for a joint prefill of 4 prompts from past their first --shared_tokens (its graph's
  forward run eagerly), with the graph's replay and a whole-prompt joint prefill timed beside it.
- prefill: k prompts of --prompt_tokens tokens, prefilled together (one forward) against one at a time (the
  lone prompt's path: a CUDA graph per width), for k in 1, 2, 4, 8, 16; with --shared_tokens, also together from
  past their first --shared_tokens (restored from kept prefixes: `rest_ms`; through a graph if the rest fits one).
- engine: --users requests of --prompt_tokens + --new_tokens at once through the decoder's tokens(), each read
  by a thread of its own, as the app reads them, --rounds times, a new prompt each time whose first
  --shared_tokens all prompts share (the app's prompts begin with their database's schema): tokens/s in all and the
  engine's timings (busy share, ms a step), for the engines of --engines: as it was (`whole-slots`: every step over
  the whole slots, each step's tokens read before the next is queued), with steps over the positions in use
  (`lengths`), with the next step queued before the last one's tokens are read (`queue-ahead`), both (`both`),
  and both with 16 prompts' prefixes kept (`prefixes`, DECODE_PREFIXES=16).
"""

import argparse
import json
import sys
import threading
import time

import torch
from common import STARCODER2_3B, SMOKE, card, device, free_memory, sync

from starsql.serve.fast import prepare_model
from starsql.serve.fast.batched import BatchedDecoder


def build_model(smoke: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM, Starcoder2Config

    torch.manual_seed(seed)
    config = Starcoder2Config(**(SMOKE if smoke else STARCODER2_3B), bos_token_id=0, eos_token_id=0)
    dtype = torch.float32 if smoke else torch.bfloat16
    with device():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    prepare_model(model)
    return model


def gpu_ms(run, repeats: int) -> float:
    """Mean milliseconds of `run` over `repeats` back-to-back calls: CUDA events on a GPU, the wall clock on a CPU."""
    run()
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return 1e3 * (time.perf_counter() - started) / repeats


def host_ms(replay, bucket, repeats: int) -> float:
    """The engine's old pattern a step: replay, wait for the GPU, tokens to the host."""
    def once():
        replay()
        sync()
        bucket.tokens.view(-1).tolist()

    once()
    started = time.perf_counter()
    for _ in range(repeats):
        once()
    return 1e3 * (time.perf_counter() - started) / repeats


@torch.inference_mode()
def step_times(model, args, rows_kernel: bool = True) -> list[dict]:
    decoder = BatchedDecoder(model, max_batch=16, max_length=2048, compile=bool(args.compile), rows_kernel=rows_kernel)
    started = time.perf_counter()
    decoder.warm_up()
    build_s = time.perf_counter() - started
    rows = []
    for bucket in decoder.buckets.values():
        # No row is live: the steps leave positions where they are.
        decoder.positions.fill_(min(args.position, bucket.length - 1))

        def replay(bucket=bucket):
            if bucket.graph is not None:
                bucket.graph.replay()
            else:
                decoder._advance(bucket)

        rows.append({"rows_kernel": rows_kernel, "length": bucket.length, "rows": bucket.rows, "graph": bucket.graph is not None,
                     "gpu_ms": round(gpu_ms(replay, args.steps), 3), "host_ms": round(host_ms(replay, bucket, args.steps), 3),
                     "build_s": round(build_s, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    del decoder
    return rows


def kernel_profile(run, calls: int, unit: str, top: int = 12) -> dict:
    """The GPU kernels (on a CPU, the ops) of `calls` back-to-back runs of `run`: microseconds a `unit`, the top ones."""
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(calls):
            run()
        sync()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in profiler.key_averages() if e.device_type == kind]

    def self_us(event) -> float:
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    ranked = sorted(events, key=self_us, reverse=True)
    return {f"kernel_us_per_{unit}": round(sum(map(self_us, events)) / calls, 1),
            "top": [{"kernel": e.key[:90], f"us_per_{unit}": round(self_us(e) / calls, 1), f"calls_per_{unit}": e.count / calls}
                    for e in ranked[:top]]}  # fmt: skip


@torch.inference_mode()
def profile_step(model, length: int, top: int = 12) -> dict:
    decoder = BatchedDecoder(model, max_batch=16, max_length=length, compile=False, lengths=())
    decoder.use_graph = False
    bucket = decoder.buckets[16, length]
    decoder.positions.fill_(min(360, length - 1))
    for _ in range(3):
        decoder._advance(bucket)
    sync()
    return {"length": length, **kernel_profile(lambda: decoder._advance(bucket), 5, "step", top)}


@torch.inference_mode()
def profile_prefill(model, args, rows: int = 4, top: int = 15) -> dict:
    """The kernels of one joint prefill of `rows` prompts from past their first --shared_tokens (the graph's
    forward, run eagerly on its fixed inputs), against the graph's replay and a whole-prompt joint prefill."""
    from starsql.serve.fast.batched import Request

    decoder = BatchedDecoder(model, max_batch=16, max_length=2048, compile=False, prefixes=16)
    decoder.warm_up()
    generator = torch.Generator().manual_seed(3)
    requests = [Request(torch.randint(model.config.vocab_size, (1, args.prompt_tokens), generator=generator), 8, None)
                for _ in range(rows)]  # fmt: skip
    slots = list(range(rows))
    whole_ms = gpu_ms(lambda: decoder._prefill_together(requests, slots), 5)
    for request in requests:
        request.reused = args.shared_tokens
    replay_ms = gpu_ms(lambda: decoder._prefill_together(requests, slots), 5)
    prefill = decoder._prefill_graph_for(rows, args.prompt_tokens - args.shared_tokens, args.prompt_tokens)
    eager_ms = gpu_ms(lambda: decoder._run_prefill_graph(prefill), 5)
    return {"rows": rows, "rest_tokens": args.prompt_tokens - args.shared_tokens, "graph": [prefill.rows, prefill.width, prefill.span],
            "whole_ms": round(whole_ms, 2), "replay_ms": round(replay_ms, 2), "eager_ms": round(eager_ms, 2),
            "replay_only_ms": round(gpu_ms(prefill.graph.replay, 5), 2) if prefill.graph is not None else None,
            **kernel_profile(lambda: decoder._run_prefill_graph(prefill), 5, "prefill", top)}  # fmt: skip


def prefill_times(model, args) -> list[dict]:
    from starsql.serve.fast.batched import Request

    decoder = BatchedDecoder(model, max_batch=16, max_length=2048, compile=False, prefixes=16 if args.shared_tokens else 0)
    decoder.warm_up()  # with prefixes, the joint prefills' graphs (of prompts' rests up to GRAPH_WIDTHS tokens) too
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    rows = []
    for k in (1, 2, 4, 8, 16):
        requests = [Request(torch.randint(vocab, (1, args.prompt_tokens), generator=generator), 8, None) for _ in range(k)]
        slots = list(range(k))
        together = gpu_ms(lambda: decoder._prefill_together(requests, slots), 5) if k > 1 else None
        alone = gpu_ms(lambda: [decoder._prefill(r, s) for r, s in zip(requests, slots)], 5)
        rows.append({"prompts": k, "together_ms": together and round(together, 2), "alone_ms": round(alone, 2),
                     "together_ms_a_prompt": together and round(together / k, 2), "alone_ms_a_prompt": round(alone / k, 2)})
        if args.shared_tokens:  # the same forward from past the restored prefix (its K/V: whatever the slots hold)
            for request in requests:
                request.reused = args.shared_tokens
            rows[-1]["rest_ms"] = round(gpu_ms(lambda: decoder._prefill_together(requests, slots), 5), 2)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


ENGINES = {"whole-slots": dict(lengths=(), queue_ahead=False, prefixes=0), "lengths": dict(queue_ahead=False, prefixes=0),
           "queue-ahead": dict(lengths=(), queue_ahead=True, prefixes=0), "both": dict(prefixes=0), "prefixes": dict(prefixes=16)}


def engine_load(model, args, engine: str) -> dict:
    decoder = BatchedDecoder(model, max_batch=16, max_length=2048, compile=bool(args.compile), **ENGINES[engine])
    decoder.start()
    generator = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    shared = torch.randint(vocab, (1, args.shared_tokens), generator=generator)

    def prompt():  # the shared first tokens, then the prompt's own
        return torch.cat([shared, torch.randint(vocab, (1, args.prompt_tokens - args.shared_tokens), generator=generator)], 1)

    results = {}
    for rounds in (1, args.rounds):  # the first: untimed (prefill graphs of the widths)
        prompts = [[prompt() for _ in range(rounds)] for _ in range(args.users)]
        before = decoder.timings.snapshot()
        counts = [0] * args.users

        def user(index):
            for round_prompt in prompts[index]:
                for _token in decoder.tokens(round_prompt, args.new_tokens):
                    counts[index] += 1

        started = time.perf_counter()
        threads = [threading.Thread(target=user, args=(i,)) for i in range(args.users)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        after = decoder.timings.snapshot()
        delta = {name: after[name] - before[name] for name in after}
        results = {"engine": engine, "users": args.users, "rounds": rounds, "tokens": sum(counts), "wall_s": round(wall, 3),
                   "tokens_per_s": round(sum(counts) / wall, 1),
                   "busy_share": round((delta["step_s"] + delta["prefill_s"]) / wall, 3),
                   "ms_a_step": round(1e3 * delta["step_s"] / max(delta["steps"], 1), 3),
                   "rows_a_step": round(delta["rows"] / max(delta["steps"], 1), 2),
                   "prefill_share": round(delta["prefill_s"] / wall, 3), "prefills": delta["prefills"],
                   "ms_a_prefill": round(1e3 * delta["prefill_s"] / max(delta["prefills"], 1), 2),
                   "reused_share": round(delta["reused_tokens"] / max(delta["prompt_tokens"], 1), 3)}  # fmt: skip
    return results  # its engine thread idles on (a daemon), holding its cache: a GPU's memory holds four


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="Write the results here (JSON).")
    parser.add_argument("--smoke", action="store_true", help="Tiny model on CPU: a wiring check.")
    parser.add_argument("--compile", type=int, default=0, choices=(0, 1), help="Compile the steps (DECODE_COMPILE).")
    parser.add_argument("--rows_kernel", default="1", help="The steps part with the rows kernel (1, DECODE_ROWS_KERNEL's "
                        "default), on cuBLAS (0), or both, one decoder after the other (1,0).")
    parser.add_argument("--position", type=int, default=360, help="Every row's position in the timed steps.")
    parser.add_argument("--steps", type=int, default=100, help="Replays timed per bucket.")
    parser.add_argument("--prompt_tokens", type=int, default=300)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shared_tokens", type=int, default=0, help="First prompt tokens all prompts share (a schema).")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"Engines of the engine part, of {', '.join(ENGINES)}.")
    parser.add_argument("--parts", default="steps,profile,prefill,engine")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.prompt_tokens, args.new_tokens, args.rounds = 3, 24, 8, 1
        args.shared_tokens = min(args.shared_tokens, 16)
    if not 0 <= args.shared_tokens < args.prompt_tokens:
        parser.error(f"--shared_tokens must be from 0 to --prompt_tokens - 1 ({args.prompt_tokens - 1}), not {args.shared_tokens}")
    if "prefill_profile" in args.parts.split(",") and not args.shared_tokens:
        parser.error("--parts prefill_profile times prompts prefilled from past their first --shared_tokens: give it, above 0")
    unknown = set(args.engines.split(",")) - ENGINES.keys()
    if unknown:
        parser.error(f"--engines: no engine {', '.join(sorted(unknown))}; they are {', '.join(ENGINES)}")
    parts = set(args.parts.split(","))
    model = build_model(args.smoke)
    result = {"card": card(), "torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k != "out"}}
    if "steps" in parts:
        result["steps"] = [row for value in args.rows_kernel.split(",") for row in step_times(model, args, value == "1")]
    if "profile" in parts:
        result["profile"] = profile_step(model, 2048)
        print(json.dumps(result["profile"], indent=1), file=sys.stderr, flush=True)
    if "prefill" in parts:
        result["prefill"] = prefill_times(model, args)
    if "prefill_profile" in parts:
        result["prefill_profile"] = profile_prefill(model, args)
        print(json.dumps(result["prefill_profile"], indent=1), file=sys.stderr, flush=True)
    if "engine" in parts:
        result["engine"] = []
        for engine in args.engines.split(","):
            result["engine"].append(engine_load(model, args, engine))
            print(json.dumps(result["engine"][-1]), file=sys.stderr, flush=True)
            free_memory()
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
