"""Continuous batching of greedy answers: many requests decoded together, each one token a step.

A decoding step of a 3B model is bound by memory bandwidth: it reads every weight once whatever the number of
rows, so 16 requests decoded together cost little more than one. `BatchedDecoder` keeps a static KV cache with
a slot (a batch row) per request. One engine thread runs everything on the model: between two steps it admits
waiting requests and drops the ones that are done (EOS, their token budget, or their stream closed), so a
request joins the running batch at the next step and leaves as soon as it is done. A request admitted alone
is prefilled through a GreedyDecoder (a CUDA graph per prompt width) and its K/V copied into a free slot;
requests waiting together when the engine admits share forwards (`prefill_tokens` padded tokens at most each),
right-padded, that write each prompt's K/V straight into its slot: one forward's kernels for several requests.
A step runs the first `rows` slots, the smallest bucket of BUCKETS that holds every busy slot; on a GPU each
bucket's step is captured as a CUDA graph (compiled twice: the one-row step, and one graph whose number of rows is a symbol).
Each row writes and reads only its own cache row, up to its own position, so a request's tokens are the ones it
gets decoded alone. Every REPORT_EVERY steps the engine writes its timings to the log.
"""

import queue
import sys
import threading
import time
from collections.abc import Iterator

import torch

from .decoder import GreedyDecoder, capture_graph, check_fits, prefill_attention
from .gemv import routing

BUCKETS = (1, 2, 4, 8, 16)  # batch sizes with a step (and a CUDA graph) of their own
REPORT_EVERY = 2000  # steps between two lines of the engine's timings in the log
PREFILL_TOKENS = 8192  # prompt tokens (padded) at most in one joint prefill by default: bounds its activations' memory
SWITCH_INTERVAL_S = 0.001  # the engine thread gets the GIL back this soon after a step (Python's default: 5 ms)


class SlotCache:
    """The K/V of the first rows of the decoder's cache, for the model's attention layers as a transformers Cache
    (they call `update` only): each row's new token's K/V go to that row's own position, and each row gets its
    whole cache row back; the mask hides what lies past its position. One-token steps only."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor):
        self.keys, self.values, self.positions = keys, values, positions

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        where = self.positions.view(-1, 1, 1, 1).expand_as(key_states)  # (rows, kv heads, 1, head dim)
        self.keys[layer_idx].scatter_(2, where, key_states)
        self.values[layer_idx].scatter_(2, where, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class PrefillCache:
    """Where a joint prefill's attention layers put K/V, as a transformers Cache (they call `update` only): each
    prompt's row goes straight to its slot's cache row from position 0 (the padding's too: past its prompt, where
    each step's mask hides it until the row's own steps overwrite it). The slots were free, so attention sees the
    new K/V only."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor):
        self.keys, self.values, self.slots = keys, values, slots

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        width = key_states.shape[2]
        self.keys[layer_idx][self.slots, :, :width] = key_states
        self.values[layer_idx][self.slots, :, :width] = value_states
        return key_states, value_states


class _Bucket:
    """The step over the first `rows` slots: views of the decoder's tensors (fixed inputs of its CUDA graph)."""

    def __init__(self, decoder: "BatchedDecoder", rows: int):
        self.rows = rows
        self.tokens = decoder.step_tokens[:rows]
        self.live = decoder.live[:rows]
        self.host = decoder.host_tokens[:rows]
        self.cache = SlotCache([k[:rows] for k in decoder.keys], [v[:rows] for v in decoder.values], decoder.positions[:rows])
        self.graph = None
        self.prepared = False


class EngineTimings:
    """What the engine thread spends its time on, written to the log every REPORT_EVERY steps: where a slow
    batch shows its cause (the GPU's step, the host between steps, prefills)."""

    FIELDS = ("steps", "rows", "step_s", "prefills", "prefilled", "prefill_s")

    def __init__(self):
        self.since = time.perf_counter()
        self.counts = dict.fromkeys(self.FIELDS, 0)  # since the last line in the log
        self.totals = dict.fromkeys(self.FIELDS, 0)  # since the start: the app's /usage
        self._lock = threading.Lock()  # /usage reads the totals from another thread: whole updates only

    def _add(self, **amounts):
        with self._lock:
            for name, amount in amounts.items():
                self.counts[name] += amount
                self.totals[name] += amount

    def prefilled(self, requests: int, seconds: float):
        self._add(prefills=1, prefilled=requests, prefill_s=seconds)

    def stepped(self, rows: int, seconds: float):
        self._add(steps=1, rows=rows, step_s=seconds)
        if self.counts["steps"] >= REPORT_EVERY:
            print(self.line(), file=sys.stderr, flush=True)
            self.counts, self.since = dict.fromkeys(self.FIELDS, 0), time.perf_counter()

    def line(self) -> str:
        c, wall = self.counts, time.perf_counter() - self.since
        return (f"Batched decoder: {c['steps']} steps in {wall:.1f} s, {c['rows'] / max(c['steps'], 1):.1f} requests a "
                f"step, {1e3 * c['step_s'] / max(c['steps'], 1):.2f} ms a step (replay to tokens on the host); "
                f"{c['prefilled']} requests in {c['prefills']} prefills, {1e3 * c['prefill_s'] / max(c['prefills'], 1):.1f} ms each")

    def snapshot(self) -> dict:
        """The totals since the start (seconds rounded to microseconds)."""
        with self._lock:
            return {name: round(value, 6) if isinstance(value, float) else value for name, value in self.totals.items()}


class Request:
    """One request: its prompt and budget, and the queue its tokens arrive on (then None; or an exception)."""

    def __init__(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None):
        self.input_ids, self.max_new_tokens, self.eos_token_id = input_ids.view(1, -1), max_new_tokens, eos_token_id
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.produced = 0
        self.closed = False  # its stream was closed (Stop, a client gone): it leaves at the next step

    def deliver(self, token: int) -> bool:
        """Hand one token over; True once the request is done."""
        self.produced += 1
        self.out.put(token)
        done = token == self.eos_token_id or self.produced >= self.max_new_tokens
        if done:
            self.out.put(None)
        return done


class BatchedDecoder:
    """Greedy decoding of up to `max_batch` requests at once over a static cache of `max_length` positions a
    slot. `tokens()` is safe to call from many threads: each call is one request, served by the engine thread.
    On a GPU each bucket's step is compiled (`compile`) and replayed as a CUDA graph; on a CPU the same loop
    runs eagerly."""

    def __init__(self, model, max_batch: int = 16, max_length: int = 2048, buckets: tuple[int, ...] = BUCKETS,
                 compile: bool | None = None, prefill_bucket: int = 64, prefill_tokens: int | None = None):  # fmt: skip
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 request, not {max_batch}")
        # Waiting requests share prefill forwards of at most this many padded tokens (0: each prompt alone).
        self.prefill_tokens = PREFILL_TOKENS if prefill_tokens is None else prefill_tokens
        # The prompts' forward: a one-stream decoder's prefill into its own cache of the same length.
        self.prefiller = GreedyDecoder(model, max_length=max_length, lengths=(), compile=False, prefill_bucket=prefill_bucket)
        self.model, self.device, self.max_batch = model, model.device, max_batch
        self.max_length = self.prefiller.max_length  # at most the model's sliding window
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (max_batch, config.num_key_value_heads, self.max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=model.dtype, device=self.device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=model.dtype, device=self.device) for _ in range(config.num_hidden_layers)]
        # Each slot's next input token and its position; `live` is 1 where a request decodes (its position advances).
        self.step_tokens = torch.zeros((max_batch, 1), dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.live = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.use_graph = self.device.type == "cuda"
        self.host_tokens = torch.zeros(max_batch, dtype=torch.long, pin_memory=self.use_graph)
        self.buckets = {rows: _Bucket(self, rows) for rows in sorted({b for b in buckets if b < max_batch} | {max_batch})}
        self._side = torch.cuda.Stream(device=self.device) if self.use_graph else None
        self._pool = torch.cuda.graph_pool_handle() if self.use_graph else None  # buckets never run at once
        compile = self.use_graph if compile is None else compile
        # Two compiles, not one a bucket: the 1-row step (the kernel's linears), then, when the next bucket's size
        # differs, torch.compile's automatic dynamic shapes make the rows a symbol, one graph for every other bucket.
        self._step = torch.compile(self._forward_step, fullgraph=True) if compile else self._forward_step
        if compile:  # all decoders share _forward_step's compile budget; past it, fullgraph raises
            import torch._dynamo as dynamo

            dynamo.config.recompile_limit += 2
        self.incoming: queue.SimpleQueue = queue.SimpleQueue()
        self.slots: dict[int, Request] = {}  # busy slot -> its request; only the engine thread touches it
        self.error: BaseException | None = None  # what stopped the engine; requests then fail with it
        self._engine: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.timings = EngineTimings()

    # --- the step ---

    def _forward_step(self, tokens: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        # Each row sees its own cache row up to its own position (our mask: transformers' would read the
        # cache's length as a Python int, one compile per length).
        positions = cache.positions
        visible = torch.arange(self.max_length, device=positions.device) <= positions[:, None]
        mask = torch.where(visible, 0.0, torch.finfo(self.model.dtype).min).to(self.model.dtype)[:, None, None, :]
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions[:, None], past_key_values=cache,
                         use_cache=True)  # fmt: skip
        return out.logits[:, -1].argmax(-1, keepdim=True)  # argmax inside the graph: no logits leave it

    def _advance(self, bucket: _Bucket):
        """One step of the bucket's rows: each gets its next token and, where live, the next position; the
        tokens are copied to the host (pinned memory on a GPU: read once the stream has run the step)."""
        with routing():  # one row (the 1 bucket): the linears through starsql.serve.fast.gemv's kernel, if the model has it
            next_tokens = self._step(bucket.tokens, bucket.cache)
        bucket.tokens.copy_(next_tokens)
        bucket.cache.positions.add_(bucket.live)
        bucket.host.copy_(next_tokens.view(-1), non_blocking=self.use_graph)

    def _prepare(self, bucket: _Bucket):
        """Compile and warm up the bucket's step (and capture it on a GPU). Only while no slot is busy: the
        warm-up steps overwrite every row's token (no position moves: no row is live)."""
        if self.use_graph:
            bucket.graph, _ = capture_graph(lambda: self._advance(bucket), self._side, warmups=3,
                                            what=f"the {bucket.rows}-row decoding step", pool=self._pool)  # fmt: skip
            self.use_graph = bucket.graph is not None
        elif self._step is not self._forward_step:
            self._advance(bucket)  # compiles it
        bucket.prepared = True

    @torch.inference_mode()
    def warm_up(self):
        """Compile and capture every bucket's step now (on a GPU, tens of seconds each the first time), not
        during users' requests. Before the engine starts."""
        if self._engine is not None:
            raise RuntimeError("warm_up() runs before the first request, not while the engine serves")
        for bucket in self.buckets.values():
            if not bucket.prepared:
                self._prepare(bucket)

    # --- the engine ---

    def _prefill(self, request: Request, slot: int) -> int:
        """One prompt's forward into the prefiller's cache (its graph of the prompt's width, on a GPU), its K/V
        copied into `slot`, and the slot's first step input set; returns the first new token."""
        cache = self.prefiller.caches[0]
        self.prefiller._prefill(cache, request.input_ids.to(self.device))
        length = request.input_ids.shape[-1]
        for layer, keys, values in zip(cache.cache.layers, self.keys, self.values):
            keys[slot, :, :length].copy_(layer.keys[0, :, :length])
            values[slot, :, :length].copy_(layer.values[0, :, :length])
        self.step_tokens[slot].copy_(cache.token[0])
        self.positions[slot].copy_(cache.position[0])
        return int(cache.token)

    def _prefill_together(self, requests: list[Request], slots: list[int]) -> list[int]:
        """The prompts' forward as one batch, right-padded to the longest, each row's K/V written into its slot
        (PrefillCache), and the slots' first step inputs set; returns each request's first new token. Eager: the
        batch's work hides the kernel launches that a lone prompt's graph saves."""
        lengths = [request.input_ids.shape[-1] for request in requests]
        rows, width = len(requests), max(lengths)
        prompts = torch.zeros((rows, width), dtype=torch.long)  # padding: any token; the mask hides it
        for row, request in enumerate(requests):
            prompts[row, : lengths[row]] = request.input_ids[0]
        positions = torch.arange(width, device=self.device)
        mask = self.prefiller._causal_mask(positions, width)  # no prompt token sees the padding after it
        on_device = torch.tensor(slots, device=self.device)
        last = torch.tensor(lengths, device=self.device) - 1
        with prefill_attention():
            out = self.model(input_ids=prompts.to(self.device), attention_mask=mask.expand(rows, -1, -1, -1),
                             position_ids=positions.expand(rows, width), use_cache=True, logits_to_keep=last,
                             past_key_values=PrefillCache(self.keys, self.values, on_device))  # fmt: skip
        # Every row's logits at every row's last position (a 1-D logits_to_keep, which transformers 5 takes
        # everywhere): each row keeps its own.
        first = out.logits[torch.arange(rows), torch.arange(rows)].argmax(-1)
        self.step_tokens[on_device] = first.view(-1, 1)
        self.positions[on_device] = last + 1
        return first.tolist()

    def _prefill_group(self, group: list[Request], slots: list[int]) -> list[int]:
        """The group's prompts prefilled into `slots`: together if more than one, else (or if the joint forward's
        activations do not fit in memory) one at a time."""
        if len(group) > 1:
            try:
                return self._prefill_together(group, slots)
            except torch.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return [self._prefill(request, slot) for request, slot in zip(group, slots)]

    def _admit(self, wait: bool):
        """Drop closed requests, then give free slots to waiting requests (waiting for one if `wait`): those
        that arrived together are prefilled together, `prefill_tokens` (padded) at most a forward."""
        for slot in [slot for slot, request in self.slots.items() if request.closed]:
            self._leave(slot)
        arrived: list[Request] = []
        while len(self.slots) + len(arrived) < self.max_batch:
            try:
                request = self.incoming.get(block=wait)
            except queue.Empty:
                break
            wait = False
            if not request.closed:
                arrived.append(request)
        free = sorted(set(range(self.max_batch)) - self.slots.keys())  # the lowest first: smaller buckets
        arrived.sort(key=lambda request: request.input_ids.shape[-1])  # similar widths together: less padding
        while arrived:
            group = [arrived.pop(0)]
            # Shortest first: the next request is the widest, its width the padded one of the group it joins.
            while arrived and (len(group) + 1) * arrived[0].input_ids.shape[-1] <= self.prefill_tokens:
                group.append(arrived.pop(0))
            slots, free = free[: len(group)], free[len(group) :]
            started = time.perf_counter()
            try:
                firsts = self._prefill_group(group, slots)
            except BaseException as error:
                for request in group + arrived:
                    request.out.put(error)
                raise
            self.timings.prefilled(len(group), time.perf_counter() - started)
            for request, slot, first in zip(group, slots, firsts):
                if not request.deliver(first):
                    self.slots[slot] = request
                    self.live[slot] = 1

    def _leave(self, slot: int):
        del self.slots[slot]
        self.live[slot] = 0

    def _decode(self):
        """One step of every busy slot, and each new token handed to its request."""
        bucket = next(b for rows, b in self.buckets.items() if rows > max(self.slots))
        if not bucket.prepared:
            raise RuntimeError("the decoder was not warmed up")
        # Few Python calls into torch a step: each lets go of the GIL and may wait for it to come back.
        started = time.perf_counter()
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            self._advance(bucket)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # releases the GIL while the step runs
        tokens = bucket.host.tolist()
        self.timings.stepped(len(self.slots), time.perf_counter() - started)
        for slot, request in list(self.slots.items()):
            if request.closed or request.deliver(tokens[slot]):
                self._leave(slot)

    @torch.inference_mode()
    def run_once(self, wait: bool = False) -> int:
        """Admit waiting requests (waiting for one if `wait` and none decodes), then one step of all. The engine
        thread loops over it; tests call it to set when requests arrive. Returns how many requests decode."""
        self._admit(wait and not self.slots)
        if self.slots:
            self._decode()
        return len(self.slots)

    def _serve(self):
        try:
            while True:
                self.run_once(wait=True)
        except BaseException as error:  # noqa: BLE001 -- every request, now and later, fails with it
            self.error = error
            for request in self.slots.values():
                request.out.put(error)
            while True:
                self.incoming.get().out.put(error)

    def start(self):
        """Start the engine thread (once); `tokens()` does."""
        with self._start_lock:
            if self._engine is None:
                self.warm_up()
                # Request threads decode text while the engine steps: it must not wait 5 ms for the GIL.
                sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
                self._engine = threading.Thread(target=self._serve, daemon=True, name="starsql-batched-decoder")
                self._engine.start()

    def submit(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> Request:
        """Queue a request for the engine (which admits it at its next step); read its tokens from `request.out`."""
        check_fits(input_ids.shape[-1], max_new_tokens, self.max_length)
        request = Request(input_ids, max_new_tokens, eos_token_id)
        self.incoming.put(request)
        return request

    def tokens(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> Iterator[int]:
        """Yield greedy token ids one by one, up to and including EOS, at most `max_new_tokens`; closing the
        generator ends the request."""
        if max_new_tokens <= 0:
            return
        request = self.submit(input_ids, max_new_tokens, eos_token_id)
        self.start()
        try:
            while (token := request.out.get()) is not None:
                if isinstance(token, BaseException):
                    raise RuntimeError(f"The batched decoder stopped: {token!r}") from token
                yield token
        finally:
            request.closed = True
