"""The most the app itself can serve: app.py over HTTP, as bench/serve_load.py drives it, with a decoder that
takes no GPU time. What is left of a request's time is Gradio's and ours, in one Python process.

    python3 bench/app_ceiling.py --out bench/results/app_ceiling.json        # a CPU is enough; ~1 min
    python3 bench/app_ceiling.py --step_ms 4 --out /tmp/app_ceiling.json     # each step as long as a GPU's

The app is imported and launched in this process (the same code as `python app.py`, the tiny random model), its
backend replaced by a stand-in batched engine: one thread that every `--step_ms` hands each request its next
token (random ids, never EOS, so every answer runs to its budget), `--prefill_ms` once per group of arrivals,
sleeping (the GIL free) as a GPU step would leave it. Users are processes of their own, as in serve_load.py,
on plain HTTP. For each user count: answers per second, tokens per second in all, time to the first update and
latency p50/p95, and the app process's CPU time per request. With --step_ms 0 the answers per second are the
ceiling of any decoder behind this app on this CPU; tokens per second at 64-token answers follow from it.
"""

import argparse
import json
import multiprocessing
import os
import queue
import random
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import ROOT, card, ensure_model, free_port


class InstantEngine:
    """A batched engine that costs `step_s` of sleep a step and `prefill_s` a group of arrivals, no compute:
    `tokens()` as starsql.serve.fast.batched.BatchedDecoder serves them, to stream_greedy."""

    def __init__(self, step_s: float, prefill_s: float):
        self.step_s, self.prefill_s = step_s, prefill_s
        self.incoming: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, daemon=True, name="instant-engine").start()

    def tokens(self, input_ids, max_new_tokens: int, eos_token_id=None):
        out: queue.SimpleQueue = queue.SimpleQueue()
        self.incoming.put((out, max_new_tokens))
        while (token := out.get()) is not None:
            yield token

    def _serve(self):
        rows, draw = [], random.Random(0)
        while True:
            arrived = [self.incoming.get()] if not rows else []
            while not self.incoming.empty():
                arrived.append(self.incoming.get())
            if arrived:
                time.sleep(self.prefill_s)
                rows += [[out, budget] for out, budget in arrived]
            time.sleep(self.step_s)
            for row in rows:
                row[0].put(draw.randrange(100, 4000))
                row[1] -= 1
                if row[1] == 0:
                    row[0].put(None)
            rows = [row for row in rows if row[1] > 0]


class InstantBackend:
    """The app's backend over an InstantEngine: the tokenizer, stream_greedy and USAGE as the batched backend's."""

    def __init__(self, tokenizer, engine: InstantEngine, concurrency: int):
        self.tokenizer, self.engine, self.concurrency = tokenizer, engine, concurrency

    def stream(self, prompt: str, max_new_tokens: int, temperature: float = 0.0):
        from starsql.serve.fast.decoder import stream_greedy

        input_ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        yield from stream_greedy(self.engine, self.tokenizer, input_ids, max_new_tokens)


class Launched:
    """serve_load.load's view of the app: its URL and its process (this one)."""

    def __init__(self, url: str):
        self.url = url
        self.process = type("Process", (), {"pid": os.getpid()})()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="The JSON to write.")
    parser.add_argument("--users", default="1,4,16", help="Concurrent users, comma-separated.")
    parser.add_argument("--rounds", type=int, default=5, help="Questions each user asks, one after another.")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--step_ms", type=float, default=0.0, help="Sleep a decoding step (0: no time at all).")
    parser.add_argument("--prefill_ms", type=float, default=0.0, help="Sleep a group of arrivals' prefill.")
    parser.add_argument("--model_dir", default="/tmp/sc2-smoke-random", help="The tiny random model; built if missing.")
    args = parser.parse_args(argv)
    users = [int(u) for u in args.users.split(",")]
    model_dir = ensure_model(args.model_dir, smoke=True)
    # FAST_DECODE=0: on a GPU machine the app would build its own decoder in the background, beside the load.
    os.environ.update(BASE_MODEL=str(model_dir), ADAPTER="", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", FAST_DECODE="0")
    sys.path.insert(0, str(ROOT))
    import app
    import serve_load

    engine = InstantEngine(args.step_ms / 1e3, args.prefill_ms / 1e3)
    app.BACKEND = InstantBackend(app.TOKENIZER, engine, concurrency=max(users))
    app.demo.queue(default_concurrency_limit=max(users), max_size=app.QUEUE_SIZE)  # the queue follows the backend
    port = free_port()
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    launched = Launched(f"http://127.0.0.1:{port}/")
    results = {"card": card(), "step_ms": args.step_ms, "prefill_ms": args.prefill_ms, "new_tokens": args.new_tokens,
               "rounds": args.rounds, "cpu_count": os.cpu_count(), "loads": []}  # fmt: skip
    with ProcessPoolExecutor(max(users), mp_context=multiprocessing.get_context("spawn")) as pool:
        for question in serve_load.QUESTIONS:  # warm: the first answers import and cache what later ones reuse
            serve_load.ask_http(launched.url, question, args.new_tokens)
        serve_load.start_users(pool, launched.url, max(users))
        for count in users:
            load = serve_load.load(pool, launched, count, args.rounds, args.new_tokens, "http")
            load.pop("each_request")
            load["answers_per_s"] = round(load["requests"] / load["wall_s"], 1)
            load["app_cpu_ms_per_request"] = round(1e3 * load["app_cpu_cores"] * load["wall_s"] / load["requests"], 1)
            results["loads"].append(load)
            print(json.dumps({k: load[k] for k in ("users", "answers_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p95_s",
                                                   "latency_p95_s", "app_cpu_ms_per_request")}), flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=1))
    app.demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
