"""Greedy decoding of one stream with static KV caches, the one-token step compiled and replayed as a CUDA graph.

On a fast GPU, `generate()` spends most of each token of a 3B model launching hundreds of small kernels
and running Python; a CUDA graph replays the whole step at once. Used by `starsql.serve.fast`'s backend.
"""

import math
import warnings
from collections.abc import Iterator
from threading import Lock

import torch

from ..decode import USAGE, statement_finished
from .gemv import routing

# One CUDA graph capture at a time in this process. Captures run in more than one thread: a serving decoder captures
# a prompt width's prefill on first use while a faster build captures its steps. A GPU run's log shows both failing
# at once that way (BENCHMARKS.md), the build then serving without graphs.
CAPTURING = Lock()


def prefill_attention():
    """Prompts' forwards attend through SDPA's flash, memory-efficient or math kernels, not cuDNN's: cuDNN plans
    new (batch, width) shapes the first time it meets them, for some a long stall on a GPU (BENCHMARKS.md) that every
    request of the batched engine waits out; the others have no such first-time cost and run as fast here.
    The switch is process-wide (torch's SDPA flags), set and restored around each forward; prefills never overlap
    (the batched engine's one thread, the one-stream decoder's lock), so nesting cannot leave it off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def capture_graph(run, side: torch.cuda.Stream, warmups: int, what: str, pool=None):
    """`run` warmed up on the `side` stream (cuBLAS picks and allocates its workspaces outside the capture),
    then one call of it captured, while no other thread captures: (graph, what that call returned), or (None, None)
    with a warning if the capture fails."""
    current = torch.cuda.current_stream(side.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmups):
            run()
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: CUDA calls of other threads (other requests) cannot break this capture.
        with CAPTURING, torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            output = run()
    except RuntimeError as error:
        warnings.warn(f"CUDA graph capture of {what} failed, running it eagerly: {str(error).splitlines()[0]}")
        graph = output = None
    current.wait_stream(side)
    return graph, output

class _CacheGraph:
    """One static KV cache of `length` positions, with the fixed inputs, output and CUDA graph of the
    one-token step over it."""

    def __init__(self, model, length: int):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.length = length
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        # Sliding-window layers branch on a Python-int length, which torch.compile specialises on: a
        # recompile every token. The window is never reached here, so plain static layers compute the same.
        self.cache.layers = [StaticLayer(max_cache_len=length) for _ in self.cache.layers]
        # The step's input token and its position; each step overwrites both with the next ones.
        self.token = torch.zeros((1, 1), dtype=torch.long, device=model.device)
        self.position = torch.zeros((1,), dtype=torch.long, device=model.device)
        self.next = None
        self.graph = None
        self.prepared = False
        # The prompt, right-padded, and its real length: the fixed inputs of the prefill graphs, one
        # graph per padded width.
        self.prompt = torch.zeros((1, length), dtype=torch.long, device=model.device)
        self.prompt_length = torch.ones((), dtype=torch.long, device=model.device)
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Where each new token lands on the host (pinned: the copy runs beside the GPU's next step).
        self.host = torch.zeros(length, dtype=torch.long, pin_memory=model.device.type == "cuda")
        self.copied = [torch.cuda.Event() for _ in range(2)] if model.device.type == "cuda" else None


class GreedyDecoder:
    """Greedy decoding of one stream with a static KV cache; on a GPU the one-token step is compiled
    and replayed as one CUDA graph.

    Each token attends over the whole static cache, so the decoder keeps caches of several `lengths` and uses
    the shortest that holds the request. Greedy only, one stream at a time: callers hold `lock`.
    On a GPU the prompt's forward (the prefill) is a CUDA graph too, one per width: the prompt is
    right-padded to a multiple of `prefill_bucket` tokens, the padding's K/V land past the prompt, where
    the mask hides them until the decoding steps overwrite them.
    Each step feeds its token and position to the next on the device, so the next step is queued
    before the host reads the current token: the GPU does not wait for Python between tokens (the
    price: a request that stops early computes one step it does not use; on a CPU, where nothing runs
    beside Python, steps are not queued ahead). The graphs are captured by hand rather than with
    torch.compile's "reduce-overhead" mode, whose CUDA graph trees are per thread, and Gradio calls
    from a different worker thread each time."""

    def __init__(self, model, max_length: int = 1024, compile: bool | None = None,
                 lengths: tuple[int, ...] = (512, 1024, 2048), prefill_bucket: int = 64):
        # At most the model's sliding window (StarCoder2's 4096): longer requests use generate().
        max_length = min(max_length, getattr(model.config, "sliding_window", None) or max_length)
        self.model = model
        self.device = model.device
        self.max_length = max_length
        self.caches = [_CacheGraph(model, n) for n in sorted({n for n in lengths if n < max_length} | {max_length})]
        self.lock = Lock()
        self.use_graph = self.device.type == "cuda"
        self._queue_ahead = self.device.type == "cuda"
        # Eager, a prefill launches every layer's kernels from Python; a graph per padded width replays them at once.
        self._graph_prefill = self.use_graph
        self._pad_prefill = self.use_graph  # fewer widths, fewer graphs (a CPU pads only where tests ask it to)
        if prefill_bucket < 1:
            raise ValueError(f"prefill_bucket must be a positive number of tokens, not {prefill_bucket}")
        self.prefill_bucket = prefill_bucket
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.use_graph else None  # one run at a time
        # Padding needs the cache's own counter of written positions (transformers 5's StaticLayer) to set back.
        if not all(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
                   for slot in self.caches for layer in slot.cache.layers):  # fmt: skip
            self._pad_prefill = self._graph_prefill = False
        # Warm-ups and captures run on one side stream of the model's GPU, as CUDA graphs ask.
        self._side = torch.cuda.Stream(device=self.device) if self.use_graph else None
        compile = self.use_graph if compile is None else compile
        # One compiled graph per cache length (dynamic=False): shapes fixed, nothing recompiles per token.
        self._step = (torch.compile(self._forward_step, fullgraph=True, dynamic=False, )
                      if compile else self._forward_step)
        if compile:  # all decoders share _forward_step's compile budget; past it, fullgraph raises
            import torch._dynamo as dynamo

            dynamo.config.recompile_limit += len(self.caches)

    def cache_length(self, tokens: int) -> int:
        """The length of the cache a request of `tokens` positions (prompt + new tokens) decodes in: the
        shortest that holds it, since each step attends over its whole cache."""
        return next(slot.length for slot in self.caches if tokens <= slot.length)

    def _causal_mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Additive mask (1, 1, len(positions), length): each query position sees the cache up to itself."""
        visible = torch.arange(length, device=positions.device) <= positions[:, None]
        return torch.where(visible, 0.0, torch.finfo(self.model.dtype).min).to(self.model.dtype)[None, None]

    def _forward_step(self, token: torch.Tensor, position: torch.Tensor, cache, length: int) -> torch.Tensor:
        # Position and mask are computed here from the `position` tensor: transformers would derive
        # the mask from a Python-int copy of the cache length, which torch.compile then specialises
        # on (a recompile every token). The cache places the new K/V by its own on-device counter.
        out = self.model(input_ids=token, attention_mask=self._causal_mask(position, length), position_ids=position.view(1, 1),
                         cache_position=position, past_key_values=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)  # argmax inside the graph: no logits leave it

    def _prefill(self, slot: _CacheGraph, input_ids: torch.Tensor):
        """The prompt's forward into the empty cache; leaves the first new token and its position as the
        first step's input (`slot.token`, `slot.position`). On a GPU it replays the graph of the padded
        width, captured on first use."""
        length = input_ids.shape[-1]
        width = min(slot.length, math.ceil(length / self.prefill_bucket) * self.prefill_bucket) if self._pad_prefill else length
        slot.prompt[:, :length].copy_(input_ids.view(1, -1))
        slot.prompt_length.fill_(length)
        if self._graph_prefill and width not in slot.prefill_graphs:
            graph = self._capture_prefill(slot, width)
            if graph is not None:
                slot.prefill_graphs[width] = graph
        if self._graph_prefill:
            slot.prefill_graphs[width].replay()
        else:
            self._prefill_forward(slot, width)

    def _prefill_forward(self, slot: _CacheGraph, width: int):
        """The forward of `slot.prompt[:, :width]`, the first `slot.prompt_length` tokens real. Causal
        mask over the cache: no real token sees the padding after it."""
        slot.cache.reset()
        positions = torch.arange(width, device=self.device)
        # Our own mask, as the step has: transformers' mask building may read tensors on the host (a sync,
        # which breaks a capture).
        mask = self._causal_mask(positions, slot.length)
        # One-row linears (the last token's head) through starsql.serve.fast.gemv's kernel, if the model has it.
        with routing(), prefill_attention():
            out = self.model(input_ids=slot.prompt[:, :width], attention_mask=mask, position_ids=positions.view(1, -1),
                             cache_position=positions, past_key_values=slot.cache, use_cache=True,
                             logits_to_keep=(slot.prompt_length - 1).view(1))  # the last real token's logits only
        for layer in slot.cache.layers:  # the cache counts the padding too: the first step goes right after the prompt
            layer.cumulative_length.copy_(slot.prompt_length)
        self._start(slot, out.logits[:, -1].argmax(-1, keepdim=True), slot.prompt_length)

    def _capture_prefill(self, slot: _CacheGraph, width: int) -> torch.cuda.CUDAGraph | None:
        """The CUDA graph of the prefill at `width`. All widths share one memory pool: they never run at
        once, and nothing they allocate is read after they run (their results are copied to the slot)."""
        graph, _ = self._capture(lambda: self._prefill_forward(slot, width), warmups=2, pool=self._prefill_pool,
                                 what="the prefill")  # fmt: skip
        if graph is None:
            self._graph_prefill = self._pad_prefill = False
        return graph

    def _capture(self, run, warmups: int, what: str, pool=None):
        return capture_graph(run, self._side, warmups, what, pool)

    def _advance(self, slot: _CacheGraph) -> torch.Tensor:
        """One step: the token after `slot.token` at `slot.position`, which then become that token and
        the next position, on the device (captured into the graph with the step)."""
        with routing():  # the step's linears through starsql.serve.fast.gemv's kernel, if the model has it (load_for_inference)
            next_token = self._step(slot.token, slot.position, slot.cache, slot.length)
        slot.token.copy_(next_token)
        slot.position.add_(1)
        return next_token

    def _prepare(self, slot: _CacheGraph):
        """Compile and warm up the step (and capture it on a GPU) on a throwaway one-token prompt, then
        empty the cache: warm-up steps write K/V and advance the cache's counter."""
        slot.prompt_length.fill_(1)
        self._prefill_forward(slot, 1)  # a throwaway one-token prompt (eager: no prefill graph for it)
        if self.use_graph:
            slot.graph, slot.next = self._capture(lambda: self._advance(slot), warmups=3, what="the decoding step")
            self.use_graph = slot.graph is not None
        else:
            for _ in range(3):
                self._advance(slot)
        slot.cache.reset()  # in place: the captured graph keeps pointing at the same memory
        slot.prepared = True

    def _start(self, slot: _CacheGraph, token: torch.Tensor, position: torch.Tensor):
        """The first step's input: the prefill's token, at the position after the prompt."""
        slot.token.copy_(token)
        slot.position.copy_(position)

    def _queue(self, slot: _CacheGraph, token: torch.Tensor, index: int):
        """Copy new token number `index` to the host without waiting for it (read with `_read`)."""
        slot.host[index : index + 1].copy_(token.view(-1), non_blocking=True)
        if slot.copied is not None:  # on the stream the copy ran on (the model's device may not be the current one)
            slot.copied[index % 2].record(torch.cuda.current_stream(token.device))

    def _read(self, slot: _CacheGraph, index: int) -> int:
        if slot.copied is not None:
            slot.copied[index % 2].synchronize()
        return int(slot.host[index])

    @torch.inference_mode()
    def tokens(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> Iterator[int]:
        """Yield greedy token ids one by one, up to and including EOS, at most `max_new_tokens`."""
        length = check_fits(input_ids.shape[-1], max_new_tokens, self.max_length)
        if max_new_tokens <= 0:
            return
        slot = next(s for s in self.caches if s.length == self.cache_length(length + max_new_tokens))
        if not slot.prepared:
            self._prepare(slot)
        self._prefill(slot, input_ids)
        self._queue(slot, slot.token, 0)  # copied before the first step overwrites it: same stream
        for index in range(max_new_tokens):
            more = index + 1 < max_new_tokens
            if more and self._queue_ahead:  # the step for token index + 1 before reading token index
                self._queue_step(slot, index + 1)
            value = self._read(slot, index)
            yield value
            if value == eos_token_id:
                return
            if more and not self._queue_ahead:
                self._queue_step(slot, index + 1)

    def _queue_step(self, slot: _CacheGraph, index: int):
        """Queue the step that makes new token number `index`, and its copy to the host."""
        if self.use_graph and slot.graph is not None:
            slot.graph.replay()
            self._queue(slot, slot.next, index)
        else:
            self._queue(slot, self._advance(slot), index)

    @torch.inference_mode()
    def warm_up(self):
        """Compile and capture every cache length now (tens of seconds each on a GPU), not during
        users' requests."""
        with self.lock:
            for slot in self.caches:
                if not slot.prepared:
                    self._prepare(slot)


def check_fits(length: int, max_new_tokens: int, max_length: int) -> int:
    """`length`, if a prompt of `length` tokens and `max_new_tokens` fit a decoder's `max_length`; else a clear error."""
    if length + max_new_tokens > max_length:
        raise ValueError(f"Prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceed the decoder's "
                         f"max_length ({max_length}): shorten the schema or ask for fewer tokens.")
    return length


def stream_greedy(decoder, tokenizer, input_ids: torch.Tensor, max_new_tokens: int) -> Iterator[str]:
    """The decoder's tokens as the text so far, as `starsql.serve.decode.stream_sql` yields it: whole characters
    only, up to EOS or the end of the first statement. `decoder`: a GreedyDecoder or an aoti.AotiDecoder (the
    caller holds its `lock`), or a batched.BatchedDecoder; closing the stream ends the request. The tokens it
    got are counted in USAGE."""
    generated: list[int] = []
    try:
        for token in decoder.tokens(input_ids, max_new_tokens, tokenizer.eos_token_id):
            generated.append(token)
            if token == tokenizer.eos_token_id:
                return
            text = tokenizer.decode(generated, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            yield text
            if statement_finished(text):
                return
    finally:
        USAGE.add(len(generated))
