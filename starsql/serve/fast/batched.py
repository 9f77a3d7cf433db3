"""Continuous batching of greedy answers: many requests decoded together, each one token a step.

A decoding step of a 3B model is bound by memory bandwidth: it reads every weight once whatever the number of
rows, so 16 requests decoded together cost little more than one. `BatchedDecoder` keeps a static KV cache with
a slot (a batch row) per request. One engine thread runs everything on the model: between two steps it admits
waiting requests and drops the ones that are done (EOS, their token budget, or their stream closed), so a
request joins the running batch at the next step and leaves as soon as it is done. A request admitted alone
is prefilled through a GreedyDecoder (a CUDA graph per prompt width) and its K/V copied into a free slot;
requests waiting together when the engine admits share forwards (`prefill_tokens` padded tokens at most each),
right-padded, that write each prompt's K/V straight into its slot: one forward's kernels for several requests.
With `prefixes` (DECODE_PREFIXES; off by default) the K/V of recent prompts are kept (prefixes.py): a prompt that
begins like one of them, alone or not, gets that prefix copied into its slot and only the rest goes through the model,
through a CUDA graph of the rows, width and positions that hold the rests of the prompts prefilled together where one
does (GRAPH_WIDTHS x LENGTHS).
A step runs the first `rows` slots over the first `length` positions of each: the smallest bucket of BUCKETS
that holds every busy slot, and the shortest of LENGTHS that holds every busy slot's position (attending over a
whole 2,048-position slot for a 300-token prompt reads K/V nobody sees). On a GPU each (rows, length) step is
captured as a CUDA graph (compiled twice: the one-row step, and one graph whose rows and length are symbols).
Each row writes and reads only its own cache row, up to its own position, so a request's tokens are the ones it
gets decoded alone. On a GPU the engine queues the next step before it hands out the current step's tokens
(`queue_ahead`): the GPU computes while the engine thread waits for Python's lock, which the app's many request
threads hold in turn. Every REPORT_EVERY steps the engine writes its timings to the log.
"""

import queue
import sys
import threading
import time
from collections.abc import Iterator

import torch

from ..decode import RecentWaits
from .decoder import GreedyDecoder, capture_graph, check_fits, prefill_attention
from .gemv import ROWS, routing
from .prefixes import PrefixStore

BUCKETS = (1, 2, 4, 8, 16)  # batch sizes with a step (and a CUDA graph) of their own
LENGTHS = (256, 512, 1024)  # slot positions a step attends over, below the slot's length (which a step always has)
REPORT_EVERY = 2000  # steps between two lines of the engine's timings in the log
PREFILL_TOKENS = 8192  # prompt tokens (padded) at most in one joint prefill by default: bounds its activations' memory
# Prompt tokens (past their kept prefixes) a joint prefill with a graph of its own runs, padded to one of these; wider
# ones run eagerly. A question past its schema, or a follow-up past the turn before, fits.
GRAPH_WIDTHS = (32, 64, 128)
SWITCH_INTERVAL_S = 0.001  # the engine thread gets the GIL back this soon after a step (Python's default: 5 ms)


class SlotCache:
    """The K/V of the first rows and positions of the decoder's cache (a step's bucket), for the model's attention
    layers as a transformers Cache (they call `update` only): each row's new token's K/V go to that row's own
    position, and each row gets those positions back; the mask hides what lies past its position. One-token steps only."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor):
        self.keys, self.values, self.positions = keys, values, positions

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        where = self.positions.view(-1, 1, 1, 1).expand_as(key_states)  # (rows, kv heads, 1, head dim)
        self.keys[layer_idx].scatter_(2, where, key_states)
        self.values[layer_idx].scatter_(2, where, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class PrefillCache:
    """Where a joint prefill's attention layers put K/V, as a transformers Cache (they call `update` only): each
    prompt's row goes straight to its slot's cache row, the padding's too (past its prompt, where each step's mask
    hides it until the row's own steps overwrite it). Without `positions`, from position 0: the slots were free, so
    attention sees the new K/V only. With them (rows, width), at each row's own positions, from where the K/V restored
    from the prefix store end (padding past the slot on its spare last position), and attention gets each slot's first
    `span` positions back: the restored prefix and the new K/V."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor,
                 positions: torch.Tensor | None = None, span: int = 0):  # fmt: skip
        self.keys, self.values, self.slots, self.positions, self.span = keys, values, slots, positions, span

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.positions is None:
            width = key_states.shape[2]
            self.keys[layer_idx][self.slots, :, :width] = key_states
            self.values[layer_idx][self.slots, :, :width] = value_states
            return key_states, value_states
        rows = self.slots[:, None]
        self.keys[layer_idx][rows, :, self.positions] = key_states.transpose(1, 2)  # (rows, width, heads, head dim)
        self.values[layer_idx][rows, :, self.positions] = value_states.transpose(1, 2)
        return self.keys[layer_idx][self.slots, :, : self.span], self.values[layer_idx][self.slots, :, : self.span]


class _Bucket:
    """The step over the first `rows` slots' first `length` positions: views of the decoder's tensors (fixed
    inputs of its CUDA graph)."""

    def __init__(self, decoder: "BatchedDecoder", rows: int, length: int):
        self.rows, self.length = rows, length
        self.tokens = decoder.step_tokens[:rows]
        self.live = decoder.live[:rows]
        self.cache = SlotCache([k[:rows, :, :length] for k in decoder.keys], [v[:rows, :, :length] for v in decoder.values],
                               decoder.positions[:rows])  # fmt: skip
        self.graph = None
        self.prepared = False


class _PrefillGraph:
    """A joint prefill of up to `rows` prompts, each up to `width` tokens past its restored prefix and `span` in all,
    attending over its slots' first `span` positions: its fixed inputs, its output (each row's first new token) and,
    on a GPU, its CUDA graph. Rows past the group's are padding: they write on slot 0's spare last position, which
    no step reads."""

    def __init__(self, decoder: "BatchedDecoder", rows: int, width: int, span: int):
        self.rows, self.width, self.span, device = rows, width, span, decoder.device
        self.prompts = torch.zeros((rows, width), dtype=torch.long, device=device)
        self.positions = torch.full((rows, width), decoder.max_length, dtype=torch.long, device=device)
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)
        self.last = torch.zeros(rows, dtype=torch.long, device=device)
        self.first = torch.zeros(rows, dtype=torch.long, device=device)
        self.graph = None


class _Step:
    """A step queued on the GPU: the requests of its rows then, and where its tokens land on the host (pinned
    memory on a GPU, read once `done` has passed)."""

    def __init__(self, rows: int, cuda: bool):
        self.host = torch.zeros(rows, dtype=torch.long, pin_memory=cuda)
        self.requests: dict[int, "Request"] = {}
        self.started = self.done = None  # BatchedDecoder._mark()s around it


class EngineTimings:
    """What the engine thread spends its time on, written to the log every REPORT_EVERY steps: where a slow
    batch shows its cause (the GPU's step, the host between steps, prefills)."""

    FIELDS = ("steps", "rows", "step_s", "prefills", "prefilled", "prefill_s", "prompt_tokens", "reused_tokens")

    def __init__(self):
        self.since = time.perf_counter()
        self.counts = dict.fromkeys(self.FIELDS, 0)  # since the last line in the log
        self.totals = dict.fromkeys(self.FIELDS, 0)  # since the start: the app's /usage
        self._lock = threading.Lock()  # /usage reads the totals from another thread: whole updates only
        self.first_tokens = RecentWaits()  # each request's wait from its submission to its first token

    def _add(self, **amounts) -> str | None:
        """Add, under the lock (two decoders may share these totals: the eager one finishing, the compiled one taking
        over); the log line, counts then reset, once REPORT_EVERY steps have passed."""
        with self._lock:
            for name, amount in amounts.items():
                self.counts[name] += amount
                self.totals[name] += amount
            if self.counts["steps"] < REPORT_EVERY:
                return None
            line = self.line()
            self.counts, self.since = dict.fromkeys(self.FIELDS, 0), time.perf_counter()
            return line

    def prefilled(self, requests: int, seconds: float, prompt_tokens: int, reused_tokens: int):
        """A prefill forward of `requests` prompts, `prompt_tokens` in all, `reused_tokens` of them restored from the
        prefix store (not run through the model)."""
        self._add(prefills=1, prefilled=requests, prefill_s=seconds, prompt_tokens=prompt_tokens, reused_tokens=reused_tokens)

    def stepped(self, rows: int, seconds: float):
        if (line := self._add(steps=1, rows=rows, step_s=seconds)) is not None:
            print(line, file=sys.stderr, flush=True)

    def line(self) -> str:
        c, wall = self.counts, time.perf_counter() - self.since
        return (f"Batched decoder: {c['steps']} steps in {wall:.1f} s, {c['rows'] / max(c['steps'], 1):.1f} requests a "
                f"step, {1e3 * c['step_s'] / max(c['steps'], 1):.2f} ms a step on the GPU; "
                f"{c['prefilled']} requests in {c['prefills']} prefills, {1e3 * c['prefill_s'] / max(c['prefills'], 1):.1f} ms each, "
                f"{c['reused_tokens']} of {c['prompt_tokens']} prompt tokens from kept prefixes")

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
        self.reused = 0  # its first prompt tokens whose K/V the prefix store gave its slot: its prefill runs the rest
        self.closed = False  # its stream was closed (Stop, a client gone): it leaves at the next step
        self.submitted = time.perf_counter()

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
    runs eagerly. `lengths`: the positions a step attends over, below `max_length` (() or (max_length,): every
    step over whole slots). `queue_ahead` (default: on a GPU) queues each step before the last one's tokens are
    handed out; the price, as for the one-stream decoder: a request that ends computes one step it does not use.
    `rows_kernel`: steps of 2 to gemv.ROWS rows compute their linears in starsql.serve.fast.gemv's rows kernel (where
    the model routes them there, as prepare_model does on a GPU), not cuBLAS."""

    def __init__(self, model, max_batch: int = 16, max_length: int = 2048, buckets: tuple[int, ...] = BUCKETS,
                 compile: bool | None = None, prefill_bucket: int = 64, prefill_tokens: int | None = None,
                 lengths: tuple[int, ...] = LENGTHS, queue_ahead: bool | None = None,
                 timings: EngineTimings | None = None, prefixes: int = 0, rows_kernel: bool = True):  # fmt: skip
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
        # One position more than a slot holds, never read (prefills with kept prefixes write their padding there): every
        # step's K/V are then a strict prefix of the cache (not contiguous) whatever its length, so one compiled step
        # serves them all (compiling specialises on it).
        shape = (max_batch, config.num_key_value_heads, self.max_length + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=model.dtype, device=self.device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=model.dtype, device=self.device) for _ in range(config.num_hidden_layers)]
        # The K/V of the last `prefixes` prompts (0, the default: none): a prompt that begins like one of them (the
        # same schema, an earlier turn) is prefilled from where they part (prefixes.py).
        self.prefixes = PrefixStore(prefixes, config.num_hidden_layers, shape[1:], model.dtype, self.device) if prefixes else None
        # Each slot's next input token and its position; `live` is 1 where a request decodes (its position advances).
        self.step_tokens = torch.zeros((max_batch, 1), dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.live = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.use_graph = self.device.type == "cuda"
        self.rows_kernel = rows_kernel
        self.queue_ahead = self.use_graph if queue_ahead is None else queue_ahead
        # The host's copy of each slot's next position (the device's, as of the last step queued): which length a step needs.
        self.next_position = [0] * max_batch
        self.lengths = sorted({n for n in lengths if n < self.max_length} | {self.max_length})
        rows = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.buckets = {(r, n): _Bucket(self, r, n) for n in self.lengths for r in rows}
        # With kept prefixes, joint prefills of prompts' rests run as CUDA graphs (without, prompts are prefilled whole).
        self.prefill_graphs = {(r, w, n): _PrefillGraph(self, r, w, n) for w in GRAPH_WIDTHS if w < self.max_length
                               for n in self.lengths for r in rows} if self.prefixes else {}  # fmt: skip
        self._side = torch.cuda.Stream(device=self.device) if self.use_graph else None
        self._pool = torch.cuda.graph_pool_handle() if self.use_graph else None  # buckets never run at once
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.use_graph else None  # nor do prefills
        # Two steps at most are in flight (one queued ahead of the one being read): each with its host tokens.
        self._steps = [_Step(max_batch, self.use_graph) for _ in range(2)]
        self._in_flight: _Step | None = None
        self._parity = 0
        compile = self.use_graph if compile is None else compile
        # Two compiles, not one a bucket: the 1-row step (the kernel's linears), then one graph whose rows are a symbol;
        # the length is a symbol in both (marked so: automatic dynamic shapes would compile again for each change).
        self._step = torch.compile(self._forward_step, fullgraph=True) if compile else self._forward_step
        if compile:  # all decoders share _forward_step's compile budget; past it, fullgraph raises
            import torch._dynamo as dynamo

            dynamo.config.recompile_limit += 4
            for bucket in self.buckets.values():
                for tensor in (bucket.tokens, bucket.cache.positions, *bucket.cache.keys, *bucket.cache.values):
                    dynamo.maybe_mark_dynamic(tensor, 0)
                for tensor in (*bucket.cache.keys, *bucket.cache.values):
                    dynamo.maybe_mark_dynamic(tensor, 2)
        self.incoming: queue.SimpleQueue = queue.SimpleQueue()
        self.slots: dict[int, Request] = {}  # busy slot -> its request; only the engine thread touches it
        self.error: BaseException | None = None  # what stopped the engine; requests then fail with it
        self.closed = False  # close() was called: no new requests; the engine thread ends once the last is done
        self._closing = False  # the engine thread has seen close()'s mark in `incoming`
        self._engine: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.timings = EngineTimings() if timings is None else timings  # shared: totals over the decoders that replace each other

    # --- the step ---

    def _forward_step(self, tokens: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        # Each row sees its own cache row up to its own position (our mask: transformers' would read the
        # cache's length as a Python int, one compile per length).
        positions = cache.positions
        visible = torch.arange(cache.keys[0].shape[2], device=positions.device) <= positions[:, None]
        mask = torch.where(visible, 0.0, torch.finfo(self.model.dtype).min).to(self.model.dtype)[:, None, None, :]
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions[:, None], past_key_values=cache,
                         use_cache=True)  # fmt: skip
        return out.logits[:, -1].argmax(-1, keepdim=True)  # argmax inside the graph: no logits leave it

    def _advance(self, bucket: _Bucket):
        """One step of the bucket's rows: each gets its next token (in `bucket.tokens`) and, where live, the next
        position."""
        # The linears of one row (the 1 bucket) through starsql.serve.fast.gemv's kernel, and with `rows_kernel` those of
        # up to its ROWS through its rows kernel, if the model has them (prepare_model).
        with routing(rows=ROWS if self.rows_kernel else 1):
            next_tokens = self._step(bucket.tokens, bucket.cache)
        bucket.tokens.copy_(next_tokens)
        bucket.cache.positions.add_(bucket.live)

    def _prepare(self, bucket: _Bucket):
        """Compile and warm up the bucket's step (and capture it on a GPU). Only while no slot is busy: the
        warm-up steps overwrite every row's token (no position moves: no row is live)."""
        if self.use_graph:
            bucket.graph, _ = capture_graph(lambda: self._advance(bucket), self._side, warmups=3, pool=self._pool,
                                            what=f"the decoding step of {bucket.rows} rows over {bucket.length} positions")  # fmt: skip
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
        if self.use_graph:  # each joint prefill's graph: its padding rows write on a spare position only
            for prefill in self.prefill_graphs.values():
                if prefill.graph is None:
                    prefill.graph, _ = capture_graph(lambda p=prefill: self._run_prefill_graph(p), self._side, warmups=2,
                                                     pool=self._prefill_pool, what=f"the prefill of {prefill.rows} prompts "
                                                     f"of {prefill.width} tokens over {prefill.span}")  # fmt: skip
                    if prefill.graph is None:  # capture failed (warned): joint prefills run eagerly
                        self.prefill_graphs = {}
                        break

    # --- the engine ---

    def _prefill(self, request: Request, slot: int) -> torch.Tensor:
        """One prompt's forward into the prefiller's cache (its graph of the prompt's width, on a GPU), its K/V
        copied into `slot`, and the slot's first step input set; returns the first new token (on the device)."""
        cache = self.prefiller.caches[0]
        self.prefiller._prefill(cache, request.input_ids.to(self.device))
        length = request.input_ids.shape[-1]
        for layer, keys, values in zip(cache.cache.layers, self.keys, self.values):
            keys[slot, :, :length].copy_(layer.keys[0, :, :length])
            values[slot, :, :length].copy_(layer.values[0, :, :length])
        self.step_tokens[slot].copy_(cache.token[0])
        self.positions[slot].copy_(cache.position[0])
        return cache.token.view(-1).clone()  # the next prompt's prefill overwrites cache.token

    def _forward_prompts(self, prompts: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, last: torch.Tensor,
                         span: int, restored: bool = True) -> torch.Tensor:  # fmt: skip
        """The forward of prompts (rows, width) at their `positions` (each row from where its restored prefix ends,
        on past its prompt for its padding, which stops at the slot's spare position), each row's K/V written into
        its slot (PrefillCache) and attending over the slot's first `span` positions up to its own; returns each
        row's next token after its `last` column. Not `restored` (every row from position 0): over the new K/V alone."""
        rows, width = prompts.shape
        positions = positions.clamp(max=self.max_length)
        if restored:
            visible = torch.arange(span, device=self.device) <= positions[:, :, None]  # no token sees the padding after it
            mask = torch.where(visible, 0.0, torch.finfo(self.model.dtype).min).to(self.model.dtype)[:, None]
            cache = PrefillCache(self.keys, self.values, slots, positions, span)
        else:
            mask = self.prefiller._causal_mask(positions[0], width).expand(rows, -1, -1, -1)
            cache = PrefillCache(self.keys, self.values, slots)
        with prefill_attention():
            out = self.model(input_ids=prompts, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=last, past_key_values=cache)  # fmt: skip
        # Every row's logits at every row's last column (a 1-D logits_to_keep, which transformers 5 takes
        # everywhere): each row keeps its own.
        each = torch.arange(rows, device=self.device)
        return out.logits[each, each].argmax(-1)

    def _run_prefill_graph(self, prefill: _PrefillGraph):
        """The joint prefill on its fixed inputs (what its CUDA graph replays)."""
        prefill.first.copy_(self._forward_prompts(prefill.prompts, prefill.positions, prefill.slots, prefill.last,
                                                  prefill.span))  # fmt: skip

    def _prefill_graph_for(self, rows: int, width: int, span: int) -> _PrefillGraph | None:
        """The smallest joint prefill graph that holds `rows` prompts of `width` tokens past their restored prefixes
        and `span` in all; None if none does."""
        return min((g for (r, w, n), g in self.prefill_graphs.items() if r >= rows and w >= width and n >= span),
                   key=lambda g: (g.width, g.span, g.rows), default=None)  # fmt: skip

    def _prefill_together(self, requests: list[Request], slots: list[int]) -> torch.Tensor:
        """The prompts' forward as one batch, each from its first token not restored from the prefix store
        (`request.reused`), right-padded to the longest such rest, each row's K/V written into its slot after its
        restored ones, and the slots' first step inputs set; returns each request's first new token (on the
        device). Through the smallest graph of (rows, width, positions attended over) that holds them if there is
        one (before its capture, as on a CPU, the same padded forward runs eagerly), else eagerly at their own width."""
        lengths = [request.input_ids.shape[-1] for request in requests]
        starts = [request.reused for request in requests]
        rows, width = len(requests), max(length - start for length, start in zip(lengths, starts))
        prefill = self._prefill_graph_for(rows, width, max(lengths))
        padded = (prefill.rows, prefill.width) if prefill is not None else (rows, width)
        prompts = torch.zeros(padded, dtype=torch.long)  # padding: any token; the mask hides it
        positions = torch.full(padded, self.max_length, dtype=torch.long)  # padding rows: the spare position
        for row, request in enumerate(requests):
            prompts[row, : lengths[row] - starts[row]] = request.input_ids[0, starts[row] :]
            positions[row] = starts[row] + torch.arange(padded[1])
        on_device = torch.tensor(slots, device=self.device)
        last = torch.zeros(padded[0], dtype=torch.long)
        last[:rows] = torch.tensor(lengths) - torch.tensor(starts) - 1
        if prefill is None:
            first = self._forward_prompts(prompts.to(self.device), positions.to(self.device), on_device,
                                          last.to(self.device), span=max(lengths), restored=any(starts))  # fmt: skip
        else:
            prefill.prompts.copy_(prompts)
            prefill.positions.copy_(positions)
            prefill.slots.zero_()[:rows] = on_device
            prefill.last.copy_(last)
            if prefill.graph is not None:
                prefill.graph.replay()
            else:
                self._run_prefill_graph(prefill)
            first = prefill.first[:rows].clone()  # the next prefill through this graph overwrites its output
        self.step_tokens[on_device] = first.view(-1, 1)
        self.positions[on_device] = torch.tensor(lengths, device=self.device)
        return first

    def _prefill_group(self, group: list[Request], slots: list[int]) -> torch.Tensor:
        """The group's prompts prefilled into `slots`: together if more than one or if a prefix was restored, else
        (or if the joint forward's activations do not fit in memory) one at a time, whole."""
        if len(group) > 1 or group[0].reused:
            try:
                return self._prefill_together(group, slots)
            except torch.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        for request in group:
            request.reused = 0  # prefilled whole: the restored K/V are overwritten with the same
        return torch.cat([self._prefill(request, slot) for request, slot in zip(group, slots)])

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
            if request is None:  # close()'s mark: requests queued before it are still served
                self._closing = True
            elif not request.closed:
                arrived.append(request)
        free = sorted(set(range(self.max_batch)) - self.slots.keys())  # the lowest first: smaller buckets
        # Each prompt's longest prefix kept, found before this admission keeps any prompt (which may take its entry).
        found = {request: self.prefixes.find(request.input_ids) for request in arrived} if self.prefixes else {}
        for request, (_entry, tokens) in found.items():
            request.reused = tokens
        width = lambda request: request.input_ids.shape[-1] - request.reused  # what its prefill runs  # noqa: E731
        arrived.sort(key=width)  # similar widths together: less padding
        prefilled: list[tuple[Request, int]] = []
        while arrived:
            group = [arrived.pop(0)]
            # Shortest first: the next request is the widest, its width the padded one of the group it joins.
            while arrived and (len(group) + 1) * width(arrived[0]) <= self.prefill_tokens:
                group.append(arrived.pop(0))
            slots, free = free[: len(group)], free[len(group) :]
            started = self._mark()
            try:
                for request, slot in zip(group, slots):
                    if request.reused:
                        self.prefixes.restore(found[request][0], self.keys, self.values, slot)
                firsts = self._prefill_group(group, slots)
                ended = self._mark()
                firsts = firsts.tolist()  # waits for the prefill (and a step queued before it)
            except BaseException as error:
                for request in group + arrived:
                    request.out.put(error)
                raise
            self.timings.prefilled(len(group), self._between(started, ended), sum(r.input_ids.shape[-1] for r in group),
                                   sum(r.reused for r in group))  # fmt: skip
            now = time.perf_counter()
            for request in group:
                self.timings.first_tokens.add(now - request.submitted)
            prefilled += zip(group, slots)
            for request, slot, first in zip(group, slots, firsts):
                self.slots[slot] = request
                self.live[slot] = 1
                self.next_position[slot] = request.input_ids.shape[-1]
                if request.deliver(first):  # done on its first token (EOS, or a budget of one)
                    self._leave(slot)
        if self.prefixes:  # before any step: a free slot's rows still hold its prompt's K/V
            for request, slot in prefilled:
                self.prefixes.keep(request.input_ids, self.keys, self.values, slot)

    def _leave(self, slot: int):
        """Free `slot`. Its position goes back to 0: a free row within a step's rows still writes K/V at its
        position, which must lie within the step's length."""
        del self.slots[slot]
        self.live[slot] = 0
        self.positions[slot] = 0
        self.next_position[slot] = 0

    def _mark(self):
        """A point in the GPU stream's time (an event, its time read once it has passed); on a CPU, where each
        operation is done when it returns, the wall clock. Between two marks lies what the GPU ran and, where the
        engine thread was slower to queue it than the GPU to run it (a joint prefill's launches, a wait for the
        GIL), the GPU's wait for it."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    @staticmethod
    def _between(start, end) -> float:
        """Seconds between two `_mark`s, once the second has passed."""
        return end - start if isinstance(start, float) else start.elapsed_time(end) / 1e3

    def _queue_step(self) -> _Step:
        """Queue one step of every busy slot (the smallest bucket that holds them), and its tokens' copy to the host."""
        rows, length = max(self.slots) + 1, max(self.next_position[slot] for slot in self.slots) + 1
        bucket = next(b for (r, n), b in self.buckets.items() if r >= rows and n >= length)  # the shortest length first
        if not bucket.prepared:
            raise RuntimeError("the decoder was not warmed up")
        step, self._parity = self._steps[self._parity], 1 - self._parity
        step.requests = dict(self.slots)
        for slot in self.slots:
            self.next_position[slot] += 1
        # Few Python calls into torch a step: each lets go of the GIL and may wait for it to come back.
        step.started = self._mark()
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            self._advance(bucket)
        step.host[: bucket.rows].copy_(bucket.tokens.view(-1), non_blocking=self.device.type == "cuda")
        step.done = self._mark()
        return step

    def _finish(self, step: _Step):
        """Wait for a queued step, then hand its token to each of its requests still decoding."""
        if not isinstance(step.done, float):
            step.done.synchronize()  # releases the GIL while the GPU works
        tokens = step.host.tolist()
        # Those that left after this step was queued (their stream closed, or a step before ended them) get nothing.
        decoding = [(slot, request) for slot, request in step.requests.items() if self.slots.get(slot) is request]
        self.timings.stepped(len(decoding), self._between(step.started, step.done))  # before a caller can read its last token
        for slot, request in decoding:
            if request.closed or request.deliver(tokens[slot]):
                self._leave(slot)

    @torch.inference_mode()
    def run_once(self, wait: bool = False) -> int:
        """Admit waiting requests (waiting for one if `wait` and nothing decodes), queue one step of all, and hand out
        the tokens of the step queued before it (`queue_ahead`) or of this one. The engine thread loops over it;
        tests call it to set when requests arrive. Returns how many requests decode."""
        self._admit(wait and not self.slots and self._in_flight is None)
        queued = self._queue_step() if self.slots else None
        if self.queue_ahead:
            queued, self._in_flight = self._in_flight, queued
        if queued is not None:
            self._finish(queued)
        return len(self.slots)

    def _serve(self):
        try:
            while not (self._closing and not self.slots and self._in_flight is None):
                self.run_once(wait=True)
        except BaseException as error:  # noqa: BLE001 -- every request, now and later, fails with it
            self.error = error
            for request in self.slots.values():
                request.out.put(error)
            while not self._closing or not self.incoming.empty():  # after close()'s mark nothing more can come
                if (request := self.incoming.get()) is None:
                    self._closing = True
                else:
                    request.out.put(error)
        self._release()

    def close(self):
        """Take no new requests; the engine thread ends once those it has are done, and frees the decoder's caches
        and CUDA graphs. For a decoder that a faster one replaces while it serves."""
        with self._start_lock:
            self.closed = True
            self.incoming.put(None)  # after every request submitted so far: the engine serves them first

    def _release(self):
        """Drop the caches and graphs (the engine thread, once closed): the GPU memory goes back now, not when the
        garbage collector finds the decoder (its compiled step refers back to it)."""
        self.buckets, self.keys, self.values, self.prefiller, self._steps, self.prefixes = {}, [], [], None, [], None
        self.prefill_graphs = {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def start(self):
        """Start the engine thread (once); `tokens()` does."""
        with self._start_lock:
            if self._engine is None:  # after close() too: requests submitted before it are served, then it ends
                self.warm_up()
                # Request threads decode text while the engine steps: it must not wait 5 ms for the GIL.
                sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
                self._engine = threading.Thread(target=self._serve, daemon=True, name="starsql-batched-decoder")
                self._engine.start()

    def submit(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> Request:
        """Queue a request for the engine (which admits it at its next step); read its tokens from `request.out`."""
        check_fits(input_ids.shape[-1], max_new_tokens, self.max_length)
        request = Request(input_ids, max_new_tokens, eos_token_id)
        with self._start_lock:  # not after close()'s mark, which the engine may have left on
            if self.closed:
                raise RuntimeError("this batched decoder was closed: a newer one serves")
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
