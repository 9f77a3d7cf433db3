"""The dedicated-GPU backend: greedy answers through a CUDA-graph decoder.

`starsql.serve.decode.build_backend(..., fast=True)` imports this package; nothing else does. Three pieces,
all turned on by `FastDecodeBackend.build`, each computing what the plain model computes:
- `fused_qkv`: q, k and v as one projection, and a new token's attention over the shared K/V heads;
- `gemv`: the one-token linear layers through a Triton matrix-vector kernel instead of cuBLAS;
- `decoder`: static KV caches, the one-token step compiled and replayed as a CUDA graph, the prompt's
  forward replayed as one too.
The decoder serves one stream at a time. Sampled answers, prompts longer than its caches, and requests
that arrive while it is busy go through plain `generate()`.
"""

from collections.abc import Iterator

from ..decode import GenerateBackend
from .decoder import GreedyDecoder, stream_greedy
from .fused_qkv import fuse_qkv_projections
from .gemv import gemv_available, use_gemv

DECODER_TOKENS = 4096  # prompt + answer the decoder holds (at most StarCoder2's window); longer requests use generate()


class FastDecodeBackend:
    """A backend (see starsql.serve.decode) over a GreedyDecoder, with plain generate() beside it."""

    def __init__(self, model, tokenizer, decoder: GreedyDecoder):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.plain = GenerateBackend(model, tokenizer)

    @classmethod
    def build(cls, model, tokenizer, max_length: int = DECODER_TOKENS) -> "FastDecodeBackend":
        """Fuse `model`'s q/k/v, route its one-token linears to the kernel (GPU with Triton), then compile and
        capture the decoder for every cache length now (minutes), not during users' requests. If that fails,
        the kernel is turned off again before the error propagates, so generate() runs on cuBLAS."""
        fuse_qkv_projections(model)
        kernel = gemv_available(model)
        if kernel:
            use_gemv(model)
        try:
            decoder = GreedyDecoder(model, max_length=max_length)
            decoder.warm_up()
        except Exception:
            if kernel:
                use_gemv(model, enabled=False)
            raise
        return cls(model, tokenizer, decoder)

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
