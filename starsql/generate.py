"""Generation: load base + adapter for inference, turn prompts into SQL (batched or streamed).

Used by the evaluation harness (batched, greedy) and the app (streamed). Both build prompts with
`starsql.prompt.build_prompt`, the template the adapter was trained on.
"""

import math
import warnings
from collections.abc import Iterator
from threading import Event, Lock, Thread

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.models.starcoder2 import modeling_starcoder2 as starcoder2

from .gemv import gemv_available, routing, use_gemv
from .modeling import resolve_model_path
from .prompt import extract_sql, first_statement_end


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


def inference_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(base_model: str, adapter: str | None = None, load_in_4bit: bool = False, device: str | None = None,
                       fuse_qkv: bool = True, gemv: bool = True):
    """(model, tokenizer) ready to generate. The adapter is merged into bf16 weights for speed,
    except on a 4-bit base, where it stays a separate LoRA layer. `fuse_qkv`: one q/k/v matmul per
    StarCoder2 attention (fuse_qkv_projections: the same model up to bf16 rounding, faster decoding;
    pass False for a model that will be saved or get another adapter). `gemv`: on a GPU with Triton, the
    linear layers of GreedyDecoder's one-token steps use starsql.gemv's kernel, not cuBLAS's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = device or inference_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base_path = resolve_model_path(base_model)
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
        if load_in_4bit
        else None
    )
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, quantization_config=quantization)
    if quantization is None:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(adapter or base_path)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if not load_in_4bit:
            model = model.merge_and_unload()
    if fuse_qkv:
        fuse_qkv_projections(model)
    if gemv and not load_in_4bit and gemv_available(model):
        use_gemv(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def grouped_query_attention(query, key, value, attention_mask, scaling: float) -> torch.Tensor:
    """Attention of few query tokens (decoding) as two matmuls and a softmax, each group of query heads
    against the K/V head it shares, without copying K/V to all query heads (transformers' SDPA path
    does under torch.compile, and cuDNN's kernel is built for long queries). `attention_mask`: None
    (all visible), boolean or additive, (batch, 1, q_len, >= kv_len). Returns (batch, q_len, heads, dim)."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    query = query.reshape(batch, kv_heads, groups * q_len, dim)  # heads are ordered kv_head-major
    scores = torch.matmul(query, key.transpose(-1, -2)).view(batch, kv_heads, groups, q_len, -1) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, None, :, : key.shape[-2]]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs.view(batch, kv_heads, groups * q_len, -1), value)
    return out.view(batch, heads, q_len, dim).transpose(1, 2)


class FusedQKVAttention(starcoder2.Starcoder2Attention):
    """StarCoder2 attention for inference, with q, k and v as one projection (`qkv_proj`, their
    weights stacked), and one new token attending through `grouped_query_attention`.

    Decoding one token is a matrix-vector product per projection; k and v (256 outputs each, for 2
    KV heads) are too small to use the GPU's memory bandwidth, and each costs a launch and a
    split-K reduction. One matmul for all three, and the decoding attention on the 2 shared K/V
    heads: BENCHMARKS.md. The forward is transformers' Starcoder2Attention.forward with the three
    projections replaced by one."""

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states, key_states, value_states = (
            states.view(hidden_shape).transpose(1, 2) for states in self.qkv_proj(hidden_states).split(self.qkv_sizes, -1)
        )
        cos, sin = position_embeddings
        query_states, key_states = starcoder2.apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        plain_mask = attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4)
        if query_states.shape[2] == 1 and not self.training and plain_mask and self.config._attn_implementation == "sdpa":
            # One new token (decoding), with SDPA's masks; flash/flex attention's masks take their own path.
            attn_output = grouped_query_attention(query_states, key_states, value_states, attention_mask, self.scaling)
            attn_weights = None
        else:
            attention_interface = starcoder2.ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, starcoder2.eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self, query_states, key_states, value_states, attention_mask,
                dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                sliding_window=getattr(self.config, "sliding_window", None), **kwargs,
            )  # fmt: skip
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return torch.nn.functional.dropout(attn_output, p=self.residual_dropout, training=self.training), attn_weights


def fuse_qkv_projections(model) -> int:
    """Give every StarCoder2 attention of `model` one q/k/v projection (FusedQKVAttention), in place.
    Plain linear layers only: a 4-bit base or an unmerged LoRA adapter is left as it is. For
    inference: the state dict then holds `qkv_proj`, which `from_pretrained` and PEFT adapters do not
    know. Returns the number of attention layers fused."""
    fused = 0
    for module in list(model.modules()):  # a list: the loop replaces child modules
        projections = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if type(module) is not starcoder2.Starcoder2Attention or any(type(p) is not torch.nn.Linear for p in projections):
            continue
        weight = projections[0].weight
        qkv = torch.nn.Linear(weight.shape[1], sum(p.out_features for p in projections),
                              bias=projections[0].bias is not None, device=weight.device, dtype=weight.dtype)  # fmt: skip
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([p.weight for p in projections]))
            if qkv.bias is not None:
                qkv.bias.copy_(torch.cat([p.bias for p in projections]))
        module.qkv_proj, module.qkv_sizes = qkv, [p.out_features for p in projections]
        del module.q_proj, module.k_proj, module.v_proj
        module.__class__ = FusedQKVAttention
        fused += 1
    return fused


def _generation_kwargs(tokenizer, max_new_tokens: int, temperature: float = 0.0) -> dict:
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
            **_generation_kwargs(tokenizer, max_new_tokens),
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

    For a 3B model on a fast GPU, `generate()` spends most of each token launching ~900 small
    kernels and running Python; the graph replays the whole step at once (BENCHMARKS.md). Each token
    attends over the whole static cache, so the decoder keeps caches of several `lengths` and uses
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
                 lengths: tuple[int, ...] = (512, 1024, 2048), compile_options: dict | None = None,
                 prefill_bucket: int = 64):
        # At most the model's sliding window (StarCoder2's 4096): longer requests use generate().
        max_length = min(max_length, getattr(model.config, "sliding_window", None) or max_length)
        self.model = model
        self.device = model.device
        self.max_length = max_length
        self.caches = [_CacheGraph(model, n) for n in sorted({n for n in lengths if n < max_length} | {max_length})]
        self.lock = Lock()
        self.use_graph = self.device.type == "cuda"
        self.queue_ahead = self.device.type == "cuda"
        # Eager, a prefill launches every layer's kernels from Python (19 ms for 300 tokens of a 3B model on
        # an H100); a graph per padded width replays them at once (8 ms, BENCHMARKS.md).
        self.graph_prefill = self.use_graph
        self.pad_prefill = self.use_graph  # fewer widths, fewer graphs (a CPU pads only where tests ask it to)
        if prefill_bucket < 1:
            raise ValueError(f"prefill_bucket must be a positive number of tokens, not {prefill_bucket}")
        self.prefill_bucket = prefill_bucket
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.use_graph else None  # one run at a time
        # Padding needs the cache's own counter of written positions (transformers 5's StaticLayer) to set back.
        if not all(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
                   for slot in self.caches for layer in slot.cache.layers):  # fmt: skip
            self.pad_prefill = self.graph_prefill = False
        # Warm-ups and captures run on one side stream of the model's GPU, as CUDA graphs ask.
        self._side = torch.cuda.Stream(device=self.device) if self.use_graph else None
        compile = self.use_graph if compile is None else compile
        # One compiled graph per cache length (dynamic=False): shapes fixed, nothing recompiles per token.
        self._step = (torch.compile(self._forward_step, fullgraph=True, dynamic=False, options=compile_options)
                      if compile else self._forward_step)
        if compile:  # all decoders share _forward_step's compile budget; past it, fullgraph raises
            import torch._dynamo as dynamo

            dynamo.config.recompile_limit += len(self.caches)
        self.last_cache_length = None  # the cache the latest request used

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
        width = min(slot.length, math.ceil(length / self.prefill_bucket) * self.prefill_bucket) if self.pad_prefill else length
        slot.prompt[:, :length].copy_(input_ids.view(1, -1))
        slot.prompt_length.fill_(length)
        if self.graph_prefill and width not in slot.prefill_graphs:
            graph = self._capture_prefill(slot, width)
            if graph is not None:
                slot.prefill_graphs[width] = graph
        if self.graph_prefill:
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
        with routing():  # one-row linears (the last token's head) through starsql.gemv's kernel, if the model has it
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
            self.graph_prefill = self.pad_prefill = False
        return graph

    def _capture(self, run, warmups: int, what: str, pool=None):
        """`run` warmed up on the side stream (cuBLAS picks and allocates its workspaces outside the capture),
        then one call of it captured: (graph, what that call returned), or (None, None) with a warning if
        the capture fails."""
        side = self._side
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmups):
                run()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA calls of other threads (other requests) cannot break this capture.
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                output = run()
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture of {what} failed, running it eagerly: {str(error).splitlines()[0]}")
            graph = output = None
        torch.cuda.current_stream(self.device).wait_stream(side)
        return graph, output

    def _advance(self, slot: _CacheGraph) -> torch.Tensor:
        """One step: the token after `slot.token` at `slot.position`, which then become that token and
        the next position, on the device (captured into the graph with the step)."""
        with routing():  # the step's linears through starsql.gemv's kernel, if the model has it (load_for_inference)
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
        length = input_ids.shape[-1]
        if length + max_new_tokens > self.max_length:
            raise ValueError(
                f"Prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceed the decoder's "
                f"max_length ({self.max_length}): shorten the schema or ask for fewer tokens."
            )
        if max_new_tokens <= 0:
            return
        slot = next(s for s in self.caches if length + max_new_tokens <= s.length)
        self.last_cache_length = slot.length
        if not slot.prepared:
            self._prepare(slot)
        self._prefill(slot, input_ids)
        self._queue(slot, slot.token, 0)  # copied before the first step overwrites it: same stream
        for index in range(max_new_tokens):
            more = index + 1 < max_new_tokens
            if more and self.queue_ahead:  # the step for token index + 1 before reading token index
                self._queue_step(slot, index + 1)
            value = self._read(slot, index)
            yield value
            if value == eos_token_id:
                return
            if more and not self.queue_ahead:
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


def stream_sql(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
               decoder: GreedyDecoder | None = None) -> Iterator[str]:
    """Yield the generated text so far, token by token, until EOS or the end of the first statement.
    Closing the generator (Gradio does on Stop) stops the generation too, not just the stream.
    Greedy requests go through `decoder` when one is given and free; others use `generate()`."""
    if max_new_tokens <= 0:
        return
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    fits = decoder is not None and inputs["input_ids"].shape[-1] + max_new_tokens <= decoder.max_length
    if fits and temperature == 0 and decoder.lock.acquire(blocking=False):
        try:
            yield from _stream_with_decoder(decoder, tokenizer, inputs["input_ids"], max_new_tokens)
        finally:
            decoder.lock.release()
        return
    from transformers import TextIteratorStreamer

    prompt_length = inputs["input_ids"].shape[1]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    cancelled = Event()
    kwargs = dict(
        **inputs,
        **_generation_kwargs(tokenizer, max_new_tokens, temperature),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopAtStatementEnd(tokenizer, prompt_length), StopWhenSet(cancelled)]),
    )
    thread = Thread(target=torch.inference_mode()(model.generate), kwargs=kwargs, daemon=True, name="starsql-generate")
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    finally:
        cancelled.set()
        thread.join()


def _stream_with_decoder(decoder: GreedyDecoder, tokenizer, input_ids: torch.Tensor, max_new_tokens: int) -> Iterator[str]:
    generated: list[int] = []
    for token in decoder.tokens(input_ids, max_new_tokens, tokenizer.eos_token_id):
        if token == tokenizer.eos_token_id:
            return
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        yield text
        if statement_finished(text):
            return
