"""Decoding: prompts -> SQL text, batched (evaluation) or streamed (the app), through a backend.

A backend streams one prompt's answer and says how many requests it serves at once:

    backend.stream(prompt, max_new_tokens, temperature) -> Iterator[str]   # the text so far, growing
    backend.concurrency -> int                                              # answers generated at once

A backend that cannot answer (an endpoint down, slow or refusing) raises `BackendError`, whose message is
for the user. `GenerateBackend` is plain `generate()`: any model, any device, greedy or sampled.
`build_backend` picks the app's backend; `starsql.serve.fast` (a dedicated GPU) and `starsql.serve.remote`
(an OpenAI-compatible endpoint) are imported only when chosen. The fast backend takes minutes to compile the
first time: `WarmingBackend` answers through plain generate() until its eager CUDA graphs are captured
(seconds), then through them until the compiled ones are ready.
Prompts come from `starsql.prompt.build_prompt`, the template the adapter was trained on.
"""

import gc
import os
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator
from threading import Event, Lock, Semaphore, Thread

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..prompt import extract_sql, first_statement_end

GENERATE_CONCURRENCY = 2  # generate() calls at once; more mostly split the same GPU between them
# While torch.compile runs in the build thread (pure Python for minutes), a generate() thread waits this long for
# the GIL after each torch call lets it go (Python's default: 5 ms, some seconds a token).
BUILD_SWITCH_INTERVAL_S = 0.0005
DECODE_BATCH = 16  # answers the fast backend decodes together (env DECODE_BATCH; 1: the one-stream decoder)
# DECODE_COMPILE=0: the fast backend's CUDA graphs are captured from the eager model: ready in seconds, not
# minutes, at slower steps (torch.compile fuses the step's small kernels).


class BackendError(RuntimeError):
    """A backend could not answer; the message says why, in words for the user."""


def statement_finished(text: str) -> bool:
    """True once `text` holds a complete SQL statement, or the model moved on to a new comment line."""
    return "\n--" in text.lstrip() or first_statement_end(text) is not None


class StopAtStatementEnd(StoppingCriteria):
    """Stop each sequence at the end of its first SQL statement (models that skip EOS run on)."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([statement_finished(t) for t in texts], device=input_ids.device)



def generation_kwargs(tokenizer, max_new_tokens: int, temperature: float = 0.0) -> dict:
    sampling = temperature > 0
    return dict(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=0.95 if sampling else None,
        top_k=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.inference_mode()
def generate_sql(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy SQL for each prompt, in order. Prompts are batched longest-first with left padding."""
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"  # decoder-only: new tokens follow the last real token
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="Generating SQL", disable=not progress):
        inputs = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(model.device)
        prompt_length = inputs["input_ids"].shape[1]
        output = model.generate(
            **inputs,
            **generation_kwargs(tokenizer, max_new_tokens),
            stopping_criteria=StoppingCriteriaList([StopAtStatementEnd(tokenizer, prompt_length)]),
        )
        texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        for index, text in zip(batch, texts):
            results[index] = extract_sql(text)
    return results


class StopWhenSet(StoppingCriteria):
    """Stop every sequence once `event` is set: the user pressed Stop or the client went away."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_sql(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0) -> Iterator[str]:
    """Yield the generated text so far, token by token, until EOS or the end of the first statement.
    Closing the generator (Gradio does on Stop) stops the generation too, not just the stream."""
    if max_new_tokens <= 0:
        return
    from transformers import TextIteratorStreamer

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    prompt_length = inputs["input_ids"].shape[1]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    cancelled = Event()
    kwargs = dict(
        **inputs,
        **generation_kwargs(tokenizer, max_new_tokens, temperature),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopAtStatementEnd(tokenizer, prompt_length), StopWhenSet(cancelled)]),
    )
    output: list[torch.Tensor] = []
    thread = Thread(target=lambda: output.append(torch.inference_mode()(model.generate)(**kwargs)), daemon=True,
                    name="starsql-generate")
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    finally:
        cancelled.set()
        thread.join()
        sequences = getattr(output[0], "sequences", output[0]) if output else None  # a dict with return_dict_in_generate
        USAGE.add(sequences.shape[1] - prompt_length if sequences is not None else 0)


class GenerateBackend:
    """Plain `generate()`, streamed: the default backend, and the fallback of every other. At most `concurrency`
    answers at once (app.py's queue sends no more; backends that fall back to it may): the others wait."""

    def __init__(self, model, tokenizer, concurrency: int = GENERATE_CONCURRENCY):
        self.model, self.tokenizer, self.concurrency = model, tokenizer, concurrency
        self._running = Semaphore(concurrency)

    def stream(self, prompt: str, max_new_tokens: int, temperature: float = 0.0) -> Iterator[str]:
        with self._running:
            yield from stream_sql(self.model, self.tokenizer, prompt, max_new_tokens, temperature)


class WarmingBackend:
    """Plain generate() until the backend that `build()` makes in a background thread is ready, then that one;
    with `faster`, a second build that starts once the first serves and replaces it when ready (the eager
    CUDA-graph decoder within seconds, then the compiled one after minutes). A replaced backend finishes the
    answers it has begun and is then closed. `concurrency` is the built backend's from the start (app.py's queue
    reads it once); until then at most `plain`'s concurrency answer at once, the others wait. If a build fails, a
    warning, and the backend that answers keeps answering (plain generate() if none was built)."""

    def __init__(self, plain: GenerateBackend, build: Callable[[], object], concurrency: int,
                 faster: Callable[[], object] | None = None):
        self.plain, self.concurrency = plain, concurrency
        self.fast = None
        self.ready = Event()  # set once every build ended, built or failed
        self.build_s: float | None = None
        self._lock = Lock()
        self._streams: Counter[int] = Counter()  # id of a built backend -> its answers in progress
        builds = [build] if faster is None else [build, faster]
        Thread(target=self._build, args=(builds,), daemon=True, name="starsql-fast-backend-build").start()

    def _build(self, builds: list[Callable[[], object]]):
        started = time.perf_counter()
        sys.setswitchinterval(min(sys.getswitchinterval(), BUILD_SWITCH_INTERVAL_S))  # for the whole process
        try:
            for index, build in enumerate(builds):
                try:
                    self._serve_with(build())
                except Exception as error:  # noqa: BLE001 -- a model the fast path cannot take still serves
                    answers = "an earlier build" if self.fast is not None else "generate()"
                    warnings.warn(f"Fast decoding is off ({type(error).__name__}: {error}); answers use {answers}.", stacklevel=2)
                    continue
                # One line in the log, which operators (and bench/serve_load.py) read.
                seconds = time.perf_counter() - started
                if index < len(builds) - 1:
                    print(f"Fast decoding is on ({seconds:.1f} s to build); a faster build follows.", file=sys.stderr, flush=True)
                else:
                    print(f"Fast decoding is ready ({seconds:.1f} s to build).", file=sys.stderr, flush=True)
        finally:
            self.build_s = time.perf_counter() - started
            self.ready.set()
            freeze_long_lived_objects()  # what the builds made (compiled code, graphs) lives as long as the process

    def _serve_with(self, built):
        """New answers go to `built`; the backend it replaces is closed now if idle, else by its last answer."""
        with self._lock:
            replaced, self.fast = self.fast, built
            idle = replaced is not None and not self._streams[id(replaced)]
        if idle:
            self._close(replaced)

    @staticmethod
    def _close(backend):
        try:
            getattr(backend, "close", lambda: None)()
        except Exception as error:  # noqa: BLE001 -- the new backend answers whatever became of the old one
            warnings.warn(f"The replaced backend did not close ({type(error).__name__}: {error}).", stacklevel=2)

    def wait(self, timeout: float | None = None):
        """The backend that answers once every build ended (the last built, or plain if all failed); None on timeout."""
        if not self.ready.wait(timeout):
            return None
        return self.fast or self.plain

    def stream(self, prompt: str, max_new_tokens: int, temperature: float = 0.0) -> Iterator[str]:
        with self._lock:
            backend = self.fast
            if backend is not None:
                self._streams[id(backend)] += 1
        if backend is None:
            yield from self.plain.stream(prompt, max_new_tokens, temperature)
            return
        try:
            yield from backend.stream(prompt, max_new_tokens, temperature)
        finally:
            with self._lock:
                self._streams[id(backend)] -= 1
                last = backend is not self.fast and not self._streams[id(backend)]
                if not self._streams[id(backend)]:
                    del self._streams[id(backend)]
            if last:
                self._close(backend)


class Usage:
    """Tokens generated and answers streamed in this process by plain generate() and the fast decoders: the
    app's /usage API (an operator's view of the load; bench/serve_load.py counts a load's tokens with it, since
    the app streams fewer updates than tokens). Not counted here: an endpoint's tokens (starsql.serve.remote), and
    on ZeroGPU, whose @spaces.GPU calls generate in a process of their own."""

    def __init__(self):
        self._lock = Lock()
        self.tokens = self.answers = 0

    def add(self, tokens: int):
        with self._lock:
            self.tokens += tokens
            self.answers += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"tokens": self.tokens, "answers": self.answers}


USAGE = Usage()


class RecentWaits:
    """How many times something waited in all, and the last `keep` waits in seconds: /usage's view of a wait such
    as the time to a first token. A reader that kept the count of an earlier look takes the newest (count - that)
    waits: its own window's (bench/serve_load.py, a load's)."""

    def __init__(self, keep: int = 1024):
        self._lock = Lock()
        self.count, self.recent = 0, deque(maxlen=keep)

    def add(self, seconds: float):
        with self._lock:
            self.count += 1
            self.recent.append(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            return {"count": self.count, "recent_s": [round(s, 5) for s in self.recent]}


def usage_report(backend) -> dict:
    """The app's /usage figures for `backend`: USAGE's totals and, with the batched decoder, its engine's
    (`decoder`: steps, rows decoded, seconds stepping, prefill forwards, requests prefilled, seconds prefilling)
    and its recent waits from a request's submission to its first token (`first_token`, RecentWaits)."""
    usage = USAGE.snapshot()
    fast = getattr(backend, "fast", backend)  # a WarmingBackend's built backend (None while it warms up)
    timings = getattr(getattr(fast, "decoder", None), "timings", None)
    if timings is not None:
        usage["decoder"] = timings.snapshot()
        usage["first_token"] = timings.first_tokens.snapshot()
    return usage


def env_switch(name: str, default: bool, on: str, off: str) -> bool:
    """The on/off switch `name` from the environment (1/0, true/false, yes/no); a clear error for anything else."""
    value = os.environ.get(name, "1" if default else "0").lower()
    if value not in ("0", "1", "false", "true", "no", "yes"):
        raise ValueError(f"{name} must be 1 ({on}) or 0 ({off}), not {value!r}")
    return value in ("1", "true", "yes")


def env_count(name: str, least: int, unit: str, least_means: str) -> int | None:
    """The whole number `name` from the environment, at least `least`; None if unset; a clear error otherwise."""
    value = os.environ.get(name)
    if value is not None and (not value.isdigit() or int(value) < least):
        raise ValueError(f"{name} must be a whole number of {unit}, {least} or more ({least}: {least_means}), not {value!r}")
    return None if value is None else int(value)


def freeze_long_lived_objects() -> bool:
    """With GC_FREEZE (on by default): collect the garbage, then move every object alive now into the permanent
    generation (gc.freeze), which Python's collections no longer walk. A serving process holds torch, the model,
    Gradio and compiled code, objects that live as long as it does; a full collection walks all of them while every
    thread waits, a pause that lands on whichever first tokens are on their way.
    Called once startup work is done (the UI built, the fast backend's builds ended). True if it froze."""
    if not env_switch("GC_FREEZE", True, "freeze what startup made", "Python's own collections"):
        return False
    gc.collect()
    gc.freeze()
    return True


def fast_decode() -> bool:
    """FAST_DECODE from the environment: 0 serves plain generate() on a dedicated GPU too (no CUDA graphs, no
    Triton kernel)."""
    return env_switch("FAST_DECODE", True, "the fast backend on a dedicated GPU", "plain generate() only")


def fast_backend_wanted(load_in_4bit: bool, zero_gpu: bool = False) -> bool:
    """Whether build_backend should build the fast backend: FAST_DECODE on, a GPU this process owns (ZeroGPU lends
    one per call) and bf16 weights (not a 4-bit base)."""
    return fast_decode() and torch.cuda.is_available() and not zero_gpu and not load_in_4bit


def decode_compile() -> bool:
    return env_switch("DECODE_COMPILE", True, "compile the fast backend's step", "do not")


def decode_eager_first() -> bool:
    """DECODE_EAGER_FIRST from the environment: while the compiled step builds (minutes the first time, tens of
    seconds on a restart), the fast backend's CUDA graphs captured from the eager model answer (seconds to build);
    0: plain generate() answers meanwhile."""
    return env_switch("DECODE_EAGER_FIRST", True, "eager CUDA graphs answer while the compiled step builds",
                      "plain generate() answers meanwhile")


def decode_aoti() -> bool:
    """DECODE_AOTI from the environment: greedy answers through the ahead-of-time compiled decoder
    (`starsql.serve.fast.aoti`) instead of the CUDA-graph decoders. Off by default: the README says why."""
    return env_switch("DECODE_AOTI", False, "the ahead-of-time compiled decoder", "do not use it")


def decode_batch() -> int:
    """DECODE_BATCH from the environment: how many answers the fast backend decodes together."""
    batch = env_count("DECODE_BATCH", 1, "answers", "one at a time")
    return DECODE_BATCH if batch is None else batch


def decode_prefill_tokens() -> int | None:
    """DECODE_PREFILL_TOKENS from the environment: the batched decoder's joint prefills hold at most this many
    padded prompt tokens (0: each prompt prefilled alone); unset: its default."""
    return env_count("DECODE_PREFILL_TOKENS", 0, "tokens", "each prompt alone")


def decode_prefixes() -> int:
    """DECODE_PREFIXES from the environment: how many prompts' K/V the batched decoder keeps, so that a prompt
    beginning like one of them (the same schema, an earlier turn) is prefilled from where they part (0, or unset:
    none, every prompt prefilled whole)."""
    return env_count("DECODE_PREFIXES", 0, "prompts", "none kept, every prompt prefilled whole") or 0


def batched_switches() -> dict:
    """The batched decoder's switches from the environment, as keyword arguments of starsql.serve.fast.build:
    DECODE_PREFILL_TOKENS, DECODE_PREFIXES, DECODE_LENGTHS=0 (every step over whole slots), DECODE_QUEUE_AHEAD=0
    (each step's tokens read before the next is queued) and DECODE_ROWS_KERNEL=0 (the linears of steps of a few rows
    on cuBLAS); each 0 is the simpler path (DECODE_PREFIXES's default)."""
    return {"prefill_tokens": decode_prefill_tokens(), "prefixes": decode_prefixes(),
            "whole_slots": not env_switch("DECODE_LENGTHS", True, "steps over the positions in use", "over whole slots"),
            "queue_ahead": env_switch("DECODE_QUEUE_AHEAD", True, "queue each step before the last one's tokens are read",
                                      "one step at a time"),
            "rows_kernel": env_switch("DECODE_ROWS_KERNEL", True, "steps of a few rows through the Triton rows kernel",
                                      "through cuBLAS")}  # fmt: skip


def build_backend(model, tokenizer, fast: bool = False, batch: int | None = None):
    """The app's backend. Plain generate() unless `fast` (a dedicated CUDA GPU, bf16 weights): then greedy
    answers through `starsql.serve.fast`, `batch` of them decoded together (default DECODE_BATCH; 1: the
    one-stream decoder), its step compiled unless DECODE_COMPILE=0; with DECODE_AOTI=1, through the ahead-of-time
    compiled decoder instead. The fast backend is built in a background thread (a WarmingBackend): plain
    generate() answers until CUDA graphs of the eager model are captured (seconds), which answer until the
    compiled ones are (minutes the first time; DECODE_EAGER_FIRST=0: plain generate() answers until then). If
    it cannot be built for this model (torch.compile or Triton fails), a warning, and the backend that answers
    keeps answering."""
    if not fast:
        return GenerateBackend(model, tokenizer)
    if decode_aoti():  # the model as loaded, exported and compiled ahead of time (or loaded from its package)
        from .fast.aoti import build_aoti_backend

        return WarmingBackend(GenerateBackend(model, tokenizer), lambda: build_aoti_backend(model, tokenizer), concurrency=1)
    from . import fast as fast_package

    batch = decode_batch() if batch is None else batch
    compile, switches, eager_first = decode_compile(), batched_switches(), decode_eager_first()
    try:
        # Changes the model in place: done here, before any request, not beside a running generate().
        fast_package.prepare_model(model)
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"Fast decoding is off ({type(error).__name__}: {error}); answers use generate().", stacklevel=2)
        return GenerateBackend(model, tokenizer)

    staged = compile and eager_first
    if staged:  # /usage's engine totals run on across the swap to the compiled decoder
        from .fast.batched import EngineTimings

        switches["timings"] = EngineTimings()

    built = []  # the first build's backend, once built (the builds run one after the other, in one thread)

    def first():
        built.append(fast_package.build(model, tokenizer, batch, compile=compile and not staged, **switches))
        return built[-1]

    def compiled():  # replaces the first build's decoder if that one serves: without graphs of its own, no gain
        return fast_package.build(model, tokenizer, batch, compile=True, replaces=bool(built), **switches)

    return WarmingBackend(GenerateBackend(model, tokenizer), first, concurrency=fast_package.concurrency(model, batch),
                          faster=compiled if staged else None)
