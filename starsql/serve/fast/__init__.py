"""The dedicated-GPU backends: greedy answers through CUDA-graph decoders.

`starsql.serve.decode.build_backend(..., fast=True)` imports this package; nothing else does. Its pieces, all
turned on by `build`, each computing what the plain model computes:
- `fused_qkv`: q, k and v as one projection, and a new token's attention over the shared K/V heads;
- `gemv`: the linear layers of a one-token step through a Triton matrix-vector kernel instead of cuBLAS, and
  those of a batched step of a few rows through a Triton kernel of its own;
- `decoder`: one stream: static KV caches, the one-token step compiled and replayed as a CUDA graph, the
  prompt's forward replayed as one too (`FastDecodeBackend`, batch 1);
- `batched`: many streams: continuous batching over a static cache with a slot per request, a CUDA graph per
  batch-size bucket (`BatchedDecodeBackend`, the default, batch 16).
Sampled answers and prompts longer than the caches go through plain `generate()`; so do requests that arrive
while the one-stream decoder is busy.
Compiled artefacts (torch.compile's caches, Triton's kernels) are kept in `compile_cache_dir()`, so that a
restart on the same hardware loads them instead of compiling again.
"""

import os
from collections.abc import Iterator
from pathlib import Path

from ..decode import GENERATE_CONCURRENCY, GenerateBackend
from .batched import LENGTHS, BatchedDecoder
from .decoder import GreedyDecoder, stream_greedy
from .fused_qkv import fuse_qkv_projections
from .gemv import gemv_available, use_gemv

DECODER_TOKENS = 4096  # prompt + answer the one-stream decoder holds (at most StarCoder2's window); longer requests use generate()
BATCH_TOKENS = 2048  # prompt + answer of each batched slot: a step attends over the positions its longest request uses


def compile_cache_dir() -> Path:
    """Where torch.compile and Triton keep what they compiled, unless TORCHINDUCTOR_CACHE_DIR says otherwise: a
    Space's persistent storage (/data) if it has one, else the Hugging Face cache; both outlive a restart, where
    PyTorch's default (/tmp) does not on a Space."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    from huggingface_hub import constants

    root = Path("/data") if os.path.isdir("/data") and os.access("/data", os.W_OK) else Path(constants.HF_HOME)
    return root / "starsql-compile-cache"


def keep_compiled_artefacts() -> Path:
    """Point torch.compile's caches (inductor's FX graphs and AOT autograd, with their Triton kernels) and
    Triton's own at compile_cache_dir(), before anything compiles; variables already set are kept."""
    directory = compile_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(directory))
    os.environ.setdefault("TRITON_CACHE_DIR", str(directory / "triton"))
    return directory


def prepare_model(model) -> bool:
    """Fuse `model`'s q/k/v and, on a GPU with Triton, route its one-token linears to the kernel, in place (quick:
    no compiling). Returns whether the kernel is on. Plain generate() runs on the prepared model too."""
    fuse_qkv_projections(model)
    kernel = gemv_available(model)
    if kernel:
        use_gemv(model)
    return kernel


def build(model, tokenizer, batch: int, max_length: int | None = None, compile: bool = True,
          prefill_tokens: int | None = None, whole_slots: bool = False, queue_ahead: bool | None = None, timings=None,
          prefixes: int = 0, replaces: bool = False, rows_kernel: bool = True):
    """The fast backend of `batch` requests at once (1: the one-stream decoder), compiled and captured now
    (minutes the first time), not during users' requests; `max_length`: prompt + answer it holds (default
    DECODER_TOKENS, BATCH_TOKENS). compile=False: the steps' CUDA graphs are captured from the eager model
    (seconds, not minutes; slower steps). `prefill_tokens`: the batched decoder's most padded prompt tokens in
    one joint prefill (0: each prompt alone; None: its default); `whole_slots`: its steps attend over whole slots,
    not over the positions in use; `queue_ahead`: its next step queued before the last one's tokens are read (None:
    on a GPU); `prefixes`: how many prompts' K/V it keeps to prefill prompts that begin alike from where they part
    (0: none); `rows_kernel`: its steps of a few rows compute their linears in gemv's rows kernel, not cuBLAS;
    `timings`: the batched.EngineTimings its engine adds to (shared by a decoder and the one replacing it).
    `replaces`: a decoder already serves on this model, which this one would replace: on a GPU, CUDA graphs that
    could not be captured (warned) are then an error, not a slower backend, and a failure leaves the model as that
    decoder uses it. Otherwise, if building fails, the kernel is turned off again before the error propagates, so
    generate() runs on cuBLAS."""
    keep_compiled_artefacts()
    kernel = prepare_model(model)
    try:
        if batch == 1:
            decoder = GreedyDecoder(model, max_length=max_length or DECODER_TOKENS, compile=None if compile else False)
            decoder.warm_up()
            check_graphs(decoder, replaces)
            return FastDecodeBackend(model, tokenizer, decoder)
        decoder = BatchedDecoder(model, max_batch=batch, max_length=max_length or BATCH_TOKENS, compile=None if compile else False,
                                 prefill_tokens=prefill_tokens, lengths=() if whole_slots else LENGTHS,
                                 queue_ahead=queue_ahead, timings=timings, prefixes=prefixes, rows_kernel=rows_kernel)  # fmt: skip
        decoder.warm_up()
        check_graphs(decoder, replaces)
        decoder.start()
        return BatchedDecodeBackend(model, tokenizer, decoder)
    except Exception:
        if kernel and not replaces:
            use_gemv(model, enabled=False)
        raise


def check_graphs(decoder, required: bool):
    """Raise if `required` and the decoder, on a GPU, runs without CUDA graphs: its steps would launch every kernel
    from Python, slower than the decoder it was built to replace. A batched decoder's caches go back first."""
    if required and decoder.device.type == "cuda" and not decoder.use_graph:
        if isinstance(decoder, BatchedDecoder):
            decoder._release()
        raise RuntimeError("its CUDA graphs could not be captured (see the warning above), so it would be slower "
                           "than the decoder that serves")


def concurrency(model, batch: int) -> int:
    """The answers the fast backend of `batch` will serve at once, known before it is built (app.py's queue
    reads it at start-up): the batch; the one-stream decoder, once captured, serves one at a time."""
    return batch if batch > 1 else (1 if next(model.parameters()).is_cuda else GENERATE_CONCURRENCY)


class FastDecodeBackend:
    """A backend (see starsql.serve.decode) over a GreedyDecoder, with plain generate() beside it."""

    def __init__(self, model, tokenizer, decoder: GreedyDecoder):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.plain = GenerateBackend(model, tokenizer)

    @property
    def concurrency(self) -> int:
        """With its CUDA graphs captured, the decoder is faster alone than beside generate() calls sharing the
        GPU, so requests queue for it. Without them it is no faster than generate()."""
        return 1 if self.decoder.use_graph else self.plain.concurrency

    def stream(self, prompt: str, max_new_tokens: int, temperature: float = 0.0) -> Iterator[str]:
        if max_new_tokens <= 0:
            return
        input_ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        fits = input_ids.shape[-1] + max_new_tokens <= self.decoder.max_length
        if temperature == 0 and fits and self.decoder.lock.acquire(blocking=False):
            try:
                yield from stream_greedy(self.decoder, self.tokenizer, input_ids.to(self.decoder.device), max_new_tokens)
            finally:
                self.decoder.lock.release()
            return
        yield from self.plain.stream(prompt, max_new_tokens, temperature)


class BatchedDecodeBackend:
    """A backend (see starsql.serve.decode) over a BatchedDecoder: greedy answers decoded together, up to its
    batch at once; sampled answers and prompts longer than a slot through plain generate() beside it."""

    def __init__(self, model, tokenizer, decoder: BatchedDecoder):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.plain = GenerateBackend(model, tokenizer)

    @property
    def concurrency(self) -> int:
        return self.decoder.max_batch

    def close(self):
        """Replaced by a faster backend: the engine ends once the answers it decodes are done."""
        self.decoder.close()

    def stream(self, prompt: str, max_new_tokens: int, temperature: float = 0.0) -> Iterator[str]:
        if max_new_tokens <= 0:
            return
        input_ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        fits = input_ids.shape[-1] + max_new_tokens <= self.decoder.max_length
        if temperature == 0 and fits and self.decoder.error is None:
            yield from stream_greedy(self.decoder, self.tokenizer, input_ids, max_new_tokens)
        else:  # at most the plain backend's concurrency at once: the others wait for it
            yield from self.plain.stream(prompt, max_new_tokens, temperature)
