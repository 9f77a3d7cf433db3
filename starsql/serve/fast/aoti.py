"""Greedy decoding through an ahead-of-time compiled forward: torch.export, then AOTInductor.

A ZeroGPU Space cannot compile or capture CUDA graphs per request, and compiling at every start costs minutes.
Here the model's forward over a static KV cache is exported once (transformers' executorch wrapper) with the
number of tokens dynamic, so one program runs the prompt's forward and each one-token step, and compiled by
AOTInductor into a package: on ZeroGPU by `spaces.aoti_compile`, elsewhere into a .pt2 file that a restart
loads in seconds. The package holds code only: the weights (and the cache) are the live model's tensors,
handed over at load, so a changed adapter never runs with stale weights and nothing is stored twice.
The package `starsql.serve.fast` does not import this module: it is imported only when chosen.
"""

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from threading import Lock

import torch

from . import DECODER_TOKENS, FastDecodeBackend, compile_cache_dir
from .decoder import check_fits

# Weights stay out of the compiled code (they are loaded from the model at load time), as spaces.aoti_compile does.
CODE_ONLY = {"aot_inductor.package_constants_in_so": False}


def _exportable(model, max_cache_len: int):
    """transformers' export recipe for the model's forward over a static cache of `max_cache_len` positions,
    (input_ids, cache_position) -> logits. Its inner module is what torch.export traces; that module's
    parameters and buffers (the cache) are the compiled program's constants. The recipe reads the static-cache
    settings from the generation config, set only while it is built."""
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    window = getattr(model.config, "sliding_window", None)
    if window is not None and max_cache_len > window:  # the recipe's cache layers do not slide
        raise ValueError(f"max_cache_len ({max_cache_len}) exceeds the model's sliding window ({window})")
    kept = model.generation_config
    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static")
    try:
        return TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_cache_len)
    finally:
        model.generation_config = kept  # plain generate() keeps its own cache


def export_decoder(model, max_cache_len: int) -> torch.export.ExportedProgram:
    """The forward over a static cache, exported with the number of new tokens dynamic (1 to max_cache_len):
    one program for the prompt (all its tokens at once) and the one-token steps. cache_position: the new
    tokens' positions (a range); their K/V are written there, and the causal mask hides every later entry."""
    tokens = torch.export.Dim("tokens", min=1, max=max_cache_len)
    example = torch.zeros((1, 2), dtype=torch.long, device=model.device)  # 2, not 1: export specialises on 1
    return _exportable(model, max_cache_len).export(
        input_ids=example, cache_position=torch.arange(2, device=model.device),
        dynamic_shapes={"input_ids": {1: tokens}, "cache_position": {0: tokens}})


def _constants(source) -> dict[str, torch.Tensor]:
    """The program's constants by name: an ExportedProgram's, or those of the unexported recipe (_exportable)."""
    if isinstance(source, torch.export.ExportedProgram):
        return {**source.state_dict, **source.constants}
    traced = source.model  # the recipe's inner module, which export traces: its names are the program's
    return {**dict(traced.named_parameters(remove_duplicate=False)),
            **dict(traced.named_buffers(remove_duplicate=False))}


def load_decoder(package_path, source):
    """The compiled package at `package_path`, its constants (weights, cache) the tensors of `source` (the
    ExportedProgram it was compiled from, or the unexported recipe of the same model), shared, not copied."""
    compiled = torch._inductor.aoti_load_package(str(package_path))
    constants = _constants(source)
    compiled.load_constants({name: constants[name] for name in compiled.get_constant_fqns()}, check_full_update=True,
                            user_managed=True)  # fmt: skip
    compiled.constants = constants  # user_managed: the program only points at them, so it keeps them alive
    return compiled


def compile_decoder(exported: torch.export.ExportedProgram, zero_gpu: bool = False, package_path=None):
    """The exported program compiled, as a callable step(input_ids=..., cache_position=...) -> logits. On
    ZeroGPU through `spaces.aoti_compile` (in memory); elsewhere into a .pt2 package at `package_path` (a
    temporary file if None), then loaded; if the package exists, it is loaded without compiling."""
    if zero_gpu:
        import spaces

        return spaces.aoti_compile(exported)
    path = Path(package_path) if package_path is not None else None
    if path is None or not path.is_file():
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside, then renamed: a process starting meanwhile never loads half a package.
        part = str(path.with_name(f"{path.stem}.{os.getpid()}.part.pt2")) if path is not None else None
        written = torch._inductor.aoti_compile_and_package(exported, package_path=part,
                                                           inductor_configs=dict(CODE_ONLY))
        path = Path(written).replace(path) if path is not None else Path(written)
    return load_decoder(path, exported)


def package_key(model, max_cache_len: int) -> str:
    """A short hash of what the compiled program depends on, so a changed model, GPU or library never loads a
    stale package: the config, the modules (repr: classes and shapes, e.g. q/k/v fused), dtype, device, the
    GPU's name and capability, torch's and transformers' versions (the traced code), the cache length."""
    import transformers

    device = model.device
    parts = {"config": model.config.to_json_string(use_diff=False), "modules": repr(model), "dtype": str(model.dtype),
             "device": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
             "max_cache_len": max_cache_len}  # fmt: skip
    if device.type == "cuda":
        parts["gpu"] = [torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class AotiDecoder:
    """Greedy decoding of one stream through a compiled step: once for the prompt, once per new token. One
    static cache: one request at a time (callers hold `lock`); each request writes it from position 0, and the
    causal mask hides what a longer request before it left past its position."""

    def __init__(self, step, max_length: int, device):
        self.step, self.max_length, self.device = step, max_length, torch.device(device)
        self.lock = Lock()

    @torch.inference_mode()
    def tokens(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> Iterator[int]:
        """Yield greedy token ids one by one, up to and including EOS, at most `max_new_tokens`."""
        length = check_fits(input_ids.shape[-1], max_new_tokens, self.max_length)
        if max_new_tokens <= 0:
            return
        ids = input_ids.view(1, -1).to(self.device)
        positions = torch.arange(length, device=self.device)
        for produced in range(1, max_new_tokens + 1):
            token = int(self.step(input_ids=ids, cache_position=positions)[0, -1].argmax())
            yield token
            if token == eos_token_id or produced == max_new_tokens:
                return
            ids = torch.tensor([[token]], device=self.device)
            positions = positions[-1:] + 1


class AotiDecodeBackend(FastDecodeBackend):
    """FastDecodeBackend over an AotiDecoder: greedy answers through it, one at a time; plain generate() beside it
    for sampled answers, prompts longer than the cache and requests that arrive while the decoder is busy."""

    @property
    def concurrency(self) -> int:
        """One static cache serves one request at a time; a second request let in beside it would only go
        through the slower generate(), so requests queue for the decoder."""
        return 1


def cache_length(model, max_cache_len: int = DECODER_TOKENS) -> int:
    """Prompt + answer the decoder's static cache holds: `max_cache_len`, at most the model's sliding window."""
    return min(max_cache_len, getattr(model.config, "sliding_window", None) or max_cache_len)


def build_aoti_backend(model, tokenizer, max_cache_len: int = DECODER_TOKENS, cache_dir=None) -> AotiDecodeBackend:
    """The AOTI backend off ZeroGPU: the decoder loaded from `cache_dir`/<package_key>.pt2 (default:
    compile_cache_dir()/aoti, which outlives a restart) without exporting, or exported and compiled there first.
    (On ZeroGPU the compile must run inside a GPU lease: app.py's zero_gpu_aoti_backend.)"""
    max_cache_len = cache_length(model, max_cache_len)
    path = Path(cache_dir or compile_cache_dir() / "aoti") / f"{package_key(model, max_cache_len)}.pt2"
    if path.is_file():
        step = load_decoder(path, _exportable(model, max_cache_len))
    else:
        step = compile_decoder(export_decoder(model, max_cache_len), package_path=path)
    return AotiDecodeBackend(model, tokenizer, AotiDecoder(step, max_cache_len, model.device))
