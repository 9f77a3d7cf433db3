"""Generation speed of StarCoder2-3B (random weights) with a random LoRA adapter, loaded as the app and the
evaluation load it (starsql.serve.load.load_for_inference). One JSON line per configuration, then a table.

    python3 bench/generate_speed.py --out $OUT/generate.jsonl     # GPU; most of the time goes to compiling
    python3 bench/generate_speed.py --smoke                       # CPU, tiny model: a wiring check

Every configuration answers a ~300-token prompt with exactly 64 new tokens, greedy. tokens_per_s = new tokens /
wall time of the whole request (prefill included), ttft_s = time to the first new token, medians of --repeats
requests.

Plain generate():
- 4bit-unmerged: 4-bit NF4 base, the adapter as separate LoRA layers (as it was trained); the baseline.
- bf16-merged: bf16 base with the adapter merged, the model load_for_inference returns.
Then the model is prepared as starsql.serve.fast.build prepares it: q/k/v fused into one
projection and, on a GPU with Triton, the one-token linear layers routed to starsql.serve.fast.gemv's kernel.
- bf16-merged-fused: plain generate() of that model (the app without the fast backend, FAST_DECODE=0).
- gemv-shapes: each weight shape's one-token product alone: cuBLAS against the kernel with its fixed block
  shape and with the best of GEMV_SWEEP, and the custom op called eagerly.
The decoder (starsql.serve.fast's GreedyDecoder; each configuration compiles and captures its own first):
- bf16-merged-graph: the one-stream decoder (DECODE_BATCH=1), built by starsql.serve.fast.build with --app_decoder_tokens: caches of
  512, 1,024, 2,048 and 4,096 positions, the shortest that holds prompt + max_new_tokens (here 512). Its tokens
  are compared with plain generate()'s on the timed prompt and on --identity_prompts more.
- bf16-merged-graph-app-default: the same, asked for the app's default --app_max_new_tokens (so the 1,024
  cache); the first 64 timed.
- bf16-merged-graph-512: the decoder with the 512 cache alone, the baseline of one change at a time:
  -512-eager-prefill (the prompt's forward run eagerly at its own width, not padded and replayed as a CUDA
  graph), -512-cublas (the one-token linear layers on cuBLAS, not the kernel), -512-cublaslt (cuBLASLt as
  PyTorch's BLAS library).
- decode-profile-fused, -cublas: the 512 decoder's one-token step under torch.profiler, with the kernel and on
  cuBLAS: GPU time and kernel launches per token, and the top kernels.
- app-concurrent16 (16: --concurrent): that many requests at once through the app's backend
  (FastDecodeBackend.stream), as many answered at a time as the backend's concurrency (app.py's queue limit):
  aggregate tokens/s and request latency. -eager-prefill: the same with the eager prefill.
- batched-concurrent1, -4, -16 (--batch): that many requests at once through the batched backend app.py builds
  by default (starsql.serve.fast.build, continuous batching, a CUDA graph per batch bucket), built once (its
  build_s on the first); batched-identity: the identity prompts all at once through it, against plain generate().
- fp32-batched-identity: the batched decoder on fp32 weights, against plain generate() of the unfused fp32 model on
  cuBLAS: the identity prompts (each the start of the next longer one) all at once with no prompt kept (prefilled
  whole), then one at a time, shortest first, each from past the one before it, then all at once (each kept whole).
- aoti: DECODE_AOTI's decoder (starsql.serve.fast.aoti) on the model as loaded (not fused): exported and compiled
  into a package in an empty folder (build_s), then built again from that package as a restarted app builds it
  (restart_s), timed as the decoders are; its tokens against plain generate()'s (bf16, so near ties may differ).
- aoti-zerogpu: app.py's ZeroGPU decoder (DECODE_AOTI=1 on ZeroGPU) off ZeroGPU: the same export compiled by
  spaces.aoti_compile (export_s, build_s), timed likewise, against bf16-merged (vs_bf16_merged), plus the cost of
  loading the package again in a new context (load_in_new_context_s). Needs the `spaces` package and a CUDA torch.
- fp32-identity: the decoder built as the app builds it, on fp32 weights, against plain generate() of the
  unfused fp32 model on cuBLAS, on the identity prompts. Kernels' rounding differences are ~2^16 times smaller
  than in bf16: a logic bug would still show, a near tie of random weights would not.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch._dynamo

from common import (
    LORA_TARGETS, card, device, emit, ensure_model, examples, free_memory, peak_gib, peak_reserved_gib, ratio, setting,
    sync, table,
)  # fmt: skip
from starsql.serve.decode import generation_kwargs
from starsql.serve.fast import DECODER_TOKENS, FastDecodeBackend, build
from starsql.serve.fast.batched import BatchedDecoder
from starsql.serve.fast.decoder import GreedyDecoder
from starsql.serve.fast.fused_qkv import FusedQKVAttention, fuse_qkv_projections
from starsql.serve.fast.gemv import GemvLinear, gemv_available, use_gemv
from starsql.serve.load import load_for_inference

BASELINE = "4bit-unmerged"


class FirstTokenClock:
    """A logits processor: its first call comes right after the prefill forward, i.e. at the first token."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            sync()
            self.at = time.perf_counter()
        return scores


class EagerPrefillDecoder(GreedyDecoder):
    """A measurement only (the -eager-prefill configurations): the app's decoder with the prompt's forward run
    eagerly at the prompt's own width, not padded and replayed as a CUDA graph. The library has no switch for
    this, so the bench overrides the decoder's prefill; the steps are the app's."""

    def _prefill(self, slot, input_ids):
        length = input_ids.shape[-1]
        slot.prompt[:, :length].copy_(input_ids.view(1, -1))
        slot.prompt_length.fill_(length)
        self._prefill_forward(slot, length)


def ensure_adapter(model_dir: Path, adapter_dir: Path) -> Path:
    """A LoRA adapter with random A *and* B (init_lora_weights=False), so merging changes the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (adapter_dir / "adapter_config.json").is_file():
        return adapter_dir
    torch.manual_seed(1)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    on_gpu = {"": 0} if torch.cuda.is_available() else None
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=on_gpu)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(adapter_dir)  # load_for_inference reads it there
    del base
    free_memory()
    return adapter_dir


def prompt_ids(tokenizer, length: int):
    """The repo's real prompts, concatenated and cut to `length` tokens: (input_ids, attention_mask), one row."""
    ids = []
    for e in examples():
        ids += tokenizer(e["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            break
    input_ids = torch.tensor([ids[:length]], device=device())
    return input_ids, torch.ones_like(input_ids)


def measure(model, tokenizer, inputs, args, warmups: int) -> dict:
    """Median of `args.repeats` timed generate calls after `warmups` untimed ones."""
    from transformers import LogitsProcessorList

    input_ids, attention_mask = inputs
    kwargs = generation_kwargs(tokenizer, args.new_tokens)  # the app's greedy settings
    times, ttfts = [], []
    for run in range(warmups + args.repeats):
        clock = FirstTokenClock()
        sync()
        start = time.perf_counter()
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, min_new_tokens=args.new_tokens,
            logits_processor=LogitsProcessorList([clock]), **kwargs,
        )  # fmt: skip
        sync()
        if run >= warmups:
            times.append(time.perf_counter() - start)
            ttfts.append(clock.at - start)
    new = output[:, input_ids.shape[1] :]
    assert new.shape[1] == args.new_tokens, f"generated {new.shape[1]} tokens, not {args.new_tokens}"
    seconds = statistics.median(times)
    return {
        "tokens_per_s": round(new.numel() / seconds, 2),
        "per_stream_tokens_per_s": round(args.new_tokens / seconds, 2),
        "time_s": round(seconds, 3),
        "ttft_s": round(statistics.median(ttfts), 4),
        "times_s": [round(t, 3) for t in times],
        "new_token_ids": new[0].tolist(),
    }


# Block shapes swept per weight shape by gemv-shapes (rows per program, columns per loop step, warps, stages).
GEMV_SWEEP = [
    (1, 1024, 4, 3), (2, 512, 4, 3), (2, 1024, 4, 3), (4, 256, 4, 4), (4, 512, 4, 3), (4, 1024, 4, 2),
    (4, 1024, 8, 3), (8, 256, 4, 4), (8, 512, 4, 3), (8, 512, 8, 3), (16, 256, 4, 3), (16, 256, 8, 4),
    (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (64, 128, 8, 3),
]
GEMV_CONFIG = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def gemv_shapes(model, dtype=torch.bfloat16) -> dict:
    """Each weight shape of the model's linear layers, one token: cuBLAS (F.linear, and GELU for c_fc) against
    starsql.serve.fast.gemv's kernel with its fixed block shape and with the best of GEMV_SWEEP, timed alone by
    triton.testing.do_bench (median, L2 flushed between calls, as a decoding step reads each weight from
    memory), with the weight bytes read per microsecond (GB/s); and the custom op called eagerly, whose host
    time (it runs in the decoder's CUDA graphs, without it) exceeds the small layers' kernel time."""
    import torch.nn.functional as F
    import triton.testing

    from starsql.serve.fast import gemv

    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            gelu = name.endswith("c_fc") and getattr(model.config, "hidden_act", None) == "gelu_pytorch_tanh"
            shapes.setdefault((*module.weight.shape, module.bias is not None, gelu), name.split(".")[-1])
    rows = []
    time_it = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")  # noqa: E731
    for (n, k, has_bias, gelu), layer in shapes.items():
        weight = torch.randn(n, k, device=device(), dtype=dtype) / k**0.5
        bias = torch.randn(n, device=device(), dtype=dtype) if has_bias else None
        x = torch.randn(1, 1, k, device=device(), dtype=dtype)
        out = torch.empty(1, 1, n, device=device(), dtype=dtype)
        cublas = lambda: F.gelu(F.linear(x, weight, bias), approximate="tanh") if gelu else F.linear(x, weight, bias)  # noqa: E731
        kernel = lambda: gemv.launch(x, weight, bias, out, gelu)  # noqa: E731
        op = lambda: torch.ops.starsql.gemv(x, weight, bias, gelu)  # noqa: E731 -- eager: the op's host time too
        error = (op().float() - cublas().float()).abs().max().item()
        sweep = {}
        for shape in GEMV_SWEEP:
            config = dict(zip(GEMV_CONFIG, shape))
            sweep[shape] = time_it(lambda: gemv.launch(x, weight, bias, out, gelu, config))
        best = min(sweep, key=sweep.get)
        times = {"cublas": time_it(cublas), "gemv": time_it(kernel), "best": sweep[best], "op": time_it(op)}
        gigabytes = n * k * weight.element_size() / 1e9
        rows.append({"layer": layer, "shape": [n, k], "gelu": gelu, "cublas_us": round(1e3 * times["cublas"], 2),
                     "gemv_us": round(1e3 * times["gemv"], 2), "speedup": round(times["cublas"] / times["gemv"], 3),
                     "cublas_gb_s": round(gigabytes / times["cublas"] * 1e3), "gemv_gb_s": round(gigabytes / times["gemv"] * 1e3),
                     "gemv_block": {**gemv.BLOCK, **gemv.LAUNCH}, "best_sweep_us": round(1e3 * times["best"], 2),
                     "op_eager_us": round(1e3 * times["op"], 2), "best_sweep_block": dict(zip(GEMV_CONFIG, best)),
                     "max_abs_diff": error})  # fmt: skip
    return {"shapes": rows}


def prepared_layers(model) -> dict:
    """How many attention layers have q/k/v fused and how many linear layers may use the gemv kernel."""
    return {"fused_qkv_layers": sum(isinstance(m, FusedQKVAttention) for m in model.modules()),
            "gemv_layers": sum(isinstance(m, GemvLinear) for m in model.modules())}  # fmt: skip


def decoder_graphs(decoder) -> dict:
    return {"cuda_graph": decoder.use_graph and all(slot.graph is not None for slot in decoder.caches),
            "prefill_graph_widths": sorted(width for slot in decoder.caches for width in slot.prefill_graphs),
            "cache_lengths": [slot.length for slot in decoder.caches]}  # fmt: skip


def dtype_name(model) -> str:
    return str(model.dtype).replace("torch.", "")


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def guarded(fn) -> dict:
    """Run one measurement; OOM and errors become fields of its line, not the end of the run."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the model stays loaded: peak = weights + this config's cache
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as error:
        return {"oom": True, "error": str(error).splitlines()[0][:300]}
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {error}"[:1000]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="Also append the JSON lines to this file.")
    parser.add_argument("--model_dir", default="/tmp/sc2-3b-random", help="The random model; built if missing.")
    parser.add_argument("--adapter_dir", default=None, help="The random adapter (default: MODEL_DIR-lora).")
    parser.add_argument("--smoke", action="store_true", help="Tiny model on CPU: a wiring check.")
    parser.add_argument("--prompt_tokens", type=int, default=300)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="Timed requests per config (median).")
    parser.add_argument("--identity_prompts", type=int, default=8, help="Prompts whose greedy tokens are compared.")
    parser.add_argument("--skip_fp32", action="store_true", help="Leave out the fp32 token-identity check.")
    parser.add_argument("--app_decoder_tokens", type=int, default=DECODER_TOKENS,
                        help="The app's decoder's max_length (starsql.serve.fast.DECODER_TOKENS).")
    parser.add_argument("--app_max_new_tokens", type=int, default=256, help="app.py's DEFAULT_NEW_TOKENS.")
    parser.add_argument("--concurrent", type=int, default=16, help="Requests sent at once to the app's backend.")
    parser.add_argument("--batch", type=int, default=16, help="The batched backend's batch (app.py's DECODE_BATCH).")
    parser.add_argument("--batch_compile", type=int, default=1, choices=(0, 1),
                        help="0: the batched backend's CUDA graphs from the eager model (app.py's DECODE_COMPILE=0).")
    parser.add_argument("--aoti_tokens", type=int, default=DECODER_TOKENS, help="The aoti decoder's cache (the app's).")
    parser.add_argument("--aoti_config", action="append", default=[],
                        help="KEY=VALUE: an inductor setting over the aoti decoder's own (repeatable; what bench/aoti_probe.py found).")
    parser.add_argument("--only", default="", help="Comma-separated configs to run (the baseline and bf16-merged always run).")
    args = parser.parse_args(argv)
    if args.smoke and args.model_dir == parser.get_default("model_dir"):
        args.model_dir = "/tmp/sc2-smoke-random"
    for item in args.aoti_config:  # read by compile_decoder at each compile
        from starsql.serve.fast.aoti import CODE_ONLY

        CODE_ONLY.update([setting(item)])
    started = time.perf_counter()
    model_dir = ensure_model(args.model_dir, smoke=args.smoke)
    adapter_dir = ensure_adapter(model_dir, Path(args.adapter_dir or f"{args.model_dir}-lora"))
    gpu = card()
    records = []
    wanted = lambda name: not args.only or name in args.only.split(",")  # noqa: E731

    def record(name: str, batch: int, result: dict, **details):
        line = {"card": gpu, "config": name, "batch": batch, "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens, **details, **result}  # fmt: skip
        line.setdefault("peak_mem_gib", peak_gib())
        line.setdefault("peak_reserved_gib", peak_reserved_gib())
        baseline = next((r for r in records if r["config"] == BASELINE), {})
        line["ratio_to_baseline"] = ratio(line.get("tokens_per_s"), baseline.get("tokens_per_s"))
        line["baseline"] = BASELINE
        emit({k: v for k, v in line.items() if k != "new_token_ids"}, args.out)
        records.append(line)
        return line

    # The baseline: 4-bit base, LoRA kept as separate layers (what a QLoRA adapter on a 4-bit base runs as).
    def four_bit() -> dict:
        loaded = time.perf_counter()
        model, tokenizer = load_for_inference(str(model_dir), str(adapter_dir), load_in_4bit=True)
        details = {"dtype": f"nf4/{dtype_name(model)}", "load_s": round(time.perf_counter() - loaded, 1)}
        return {**details, **measure(model, tokenizer, prompt_ids(tokenizer, args.prompt_tokens), args, warmups=1)}

    record(BASELINE, 1, guarded(four_bit), merged=False)
    free_memory()

    # bf16 with the adapter merged: what load_for_inference returns on a GPU.
    loaded = time.perf_counter()
    model, tokenizer = load_for_inference(str(model_dir), str(adapter_dir))
    details = {"dtype": dtype_name(model), "merged": True, "load_s": round(time.perf_counter() - loaded, 1)}
    single = prompt_ids(tokenizer, args.prompt_tokens)
    plain = record("bf16-merged", 1, guarded(lambda: measure(model, tokenizer, single, args, warmups=1)), **details)

    def plain_tokens(model_, prompts) -> list[list[int]]:
        """Plain generate (dynamic cache, eager, F.linear), greedy, stopping at EOS like the decoder."""
        outputs = []
        for input_ids, attention_mask in prompts:
            out = model_.generate(input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs(tokenizer, args.new_tokens))
            new = out[0, input_ids.shape[1] :].tolist()
            outputs.append(new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new)
        return outputs

    identity = [prompt_ids(tokenizer, args.prompt_tokens - 24 * i) for i in range(1, args.identity_prompts + 1)]

    def identity_report(decoder, reference=None, together: bool = False, shortest_first: bool = False) -> dict:
        """The decoder's greedy tokens on the identity prompts against `reference`, by default plain generate's
        of the model the decoder runs. `together`: all prompts at once, each from its own thread (the batched
        decoder decodes them in one batch); else one after another, the longest first unless `shortest_first`."""
        from concurrent.futures import ThreadPoolExecutor

        reference = plain_tokens(decoder.model, identity) if reference is None else reference
        decode = lambda ids: list(decoder.tokens(ids, args.new_tokens, tokenizer.eos_token_id))  # noqa: E731
        if together:
            with ThreadPoolExecutor(len(identity)) as pool:
                decoded = list(pool.map(decode, [ids for ids, _ in identity]))
        elif shortest_first:
            decoded = [decode(ids) for ids, _ in identity[::-1]][::-1]
        else:
            decoded = [decode(ids) for ids, _ in identity]
        mismatches = [first_mismatch(a, b) for a, b in zip(decoded, reference)]
        return {"identity_prompts_identical": sum(m is None for m in mismatches), "identity_prompts": len(mismatches),
                "identity_first_mismatches": mismatches}  # fmt: skip

    def request(decoder, max_new_tokens: int, timed: int | None = None) -> tuple[list[int], float, float]:
        """One request of the timed prompt, no EOS (it runs to max_new_tokens): its first `timed` new tokens,
        the seconds to the first and the seconds to the last of them."""
        sync()
        start = time.perf_counter()
        new, first = [], None
        stream = decoder.tokens(single[0], max_new_tokens)
        for token in stream:
            first = first or time.perf_counter()
            new.append(token)
            if len(new) == (timed or max_new_tokens):
                break
        stream.close()
        return new, first - start, time.perf_counter() - start

    def aoti_speed() -> dict:
        import tempfile

        from starsql.serve.fast.aoti import build_aoti_backend

        folder = tempfile.mkdtemp(prefix="starsql-aoti-")
        building = time.perf_counter()
        build_aoti_backend(model, tokenizer, max_cache_len=args.aoti_tokens, cache_dir=folder)
        build_s = time.perf_counter() - building
        restarting = time.perf_counter()
        decoder = build_aoti_backend(model, tokenizer, max_cache_len=args.aoti_tokens, cache_dir=folder).decoder
        restart_s = time.perf_counter() - restarting
        runs = [request(decoder, args.new_tokens) for _ in range(args.repeats + 1)][1:]  # the first untimed
        seconds = statistics.median(total for _, _, total in runs)
        mismatch = first_mismatch(runs[-1][0], plain.get("new_token_ids", []))
        return {"tokens_per_s": round(args.new_tokens / seconds, 2), "time_s": round(seconds, 3),
                "ttft_s": round(statistics.median(ttft for _, ttft, _ in runs), 4), "build_s": round(build_s, 1),
                "restart_s": round(restart_s, 1), "cache_length_used": decoder.max_length, "aoti_config": args.aoti_config,
                "vs_bf16_merged": ratio(round(args.new_tokens / seconds, 2), plain.get("tokens_per_s")),
                "identical_to_bf16_merged": mismatch is None, "first_mismatch": mismatch,
                **identity_report(decoder, reference=plain_tokens(model, identity))}  # fmt: skip

    if wanted("aoti"):  # before the model is fused: DECODE_AOTI exports the model as loaded
        record("aoti", 1, guarded(aoti_speed), **details)
        free_memory()

    def aoti_zero_gpu_speed() -> dict:
        """What app.py's zero_gpu_aoti_backend builds, off ZeroGPU: the same export compiled by spaces.aoti_compile.
        spaces keeps the loaded program per context (a ContextVar), so a call from a new context loads the package
        again: timed apart (load_in_new_context_s) from the requests, which share one context."""
        import contextvars

        from starsql.serve.fast.aoti import AotiDecoder, cache_length, compile_decoder, export_decoder

        tokens = cache_length(model, args.aoti_tokens)
        building = time.perf_counter()
        exported = export_decoder(model, tokens)
        export_s = time.perf_counter() - building
        decoder = AotiDecoder(compile_decoder(exported, zero_gpu=True), tokens, model.device)
        build_s = time.perf_counter() - building
        _, _, first_s = contextvars.Context().run(request, decoder, args.new_tokens)
        runs = [request(decoder, args.new_tokens) for _ in range(args.repeats + 1)][1:]  # the first untimed
        seconds = statistics.median(total for _, _, total in runs)
        mismatch = first_mismatch(runs[-1][0], plain.get("new_token_ids", []))
        tokens_per_s = round(args.new_tokens / seconds, 2)
        return {"tokens_per_s": tokens_per_s, "time_s": round(seconds, 3),
                "ttft_s": round(statistics.median(ttft for _, ttft, _ in runs), 4), "export_s": round(export_s, 1),
                "build_s": round(build_s, 1), "load_in_new_context_s": round(first_s - seconds, 2),
                "cache_length_used": tokens, "vs_bf16_merged": ratio(tokens_per_s, plain.get("tokens_per_s")),
                "identical_to_bf16_merged": mismatch is None, "first_mismatch": mismatch,
                **identity_report(decoder, reference=plain_tokens(model, identity))}  # fmt: skip

    if wanted("aoti-zerogpu"):  # the model as loaded, as on ZeroGPU (bf16, merged, not fused)
        record("aoti-zerogpu", 1, guarded(aoti_zero_gpu_speed), **details)
        free_memory()

    # The app's model: prepared as FastDecodeBackend.build prepares it (q/k/v fused, the gemv kernel where it runs),
    # so that plain generate() and the kernel can be measured on it too. build's own preparation then changes nothing.
    details["fused_qkv_layers"] = fuse_qkv_projections(model)
    details["gemv_layers"] = use_gemv(model) if gemv_available(model) else 0
    if details["gemv_layers"] and wanted("gemv-shapes"):
        record("gemv-shapes", 1, guarded(lambda: gemv_shapes(model)), **details)

    def app_backend() -> FastDecodeBackend:
        """What app.py builds on a dedicated GPU: every cache compiled and captured."""
        try:
            return build(model, tokenizer, 1, max_length=args.app_decoder_tokens)
        finally:  # a failed build turns the kernel off; the configurations after it keep the app's model
            if details["gemv_layers"]:
                use_gemv(model)

    def one_cache(length: int, decoder_class=GreedyDecoder) -> GreedyDecoder:
        """The app's decoder with one cache of `length` positions, compiled and captured."""
        decoder = decoder_class(model, max_length=length, lengths=())
        decoder.warm_up()
        return decoder

    def decoder_speed(build, reserve: int | None = None, check_identity: bool = True) -> dict:
        """The decoder `build()` returns, compiled and captured, timed on the prompt: median of --repeats requests
        after one untimed (its first request captures the prompt width's prefill graph). `reserve`: max_new_tokens
        as the request asks, which picks the cache; its first new_tokens are timed."""
        building = time.perf_counter()
        decoder = build()
        compile_s = time.perf_counter() - building
        runs = [request(decoder, reserve or args.new_tokens, args.new_tokens) for _ in range(args.repeats + 1)][1:]
        new = runs[-1][0]
        seconds = statistics.median(total for _, _, total in runs)
        mismatch = first_mismatch(new, plain.get("new_token_ids", []))
        return {"tokens_per_s": round(len(new) / seconds, 2), "per_stream_tokens_per_s": round(len(new) / seconds, 2),
                "time_s": round(seconds, 3), "ttft_s": round(statistics.median(ttft for _, ttft, _ in runs), 4),
                "times_s": [round(total, 3) for _, _, total in runs], "compile_and_capture_s": round(compile_s, 1),
                "new_token_ids": new, **decoder_graphs(decoder),
                "cache_length_used": decoder.cache_length(single[0].shape[-1] + (reserve or args.new_tokens)),
                "identical_to_bf16_merged": mismatch is None, "first_mismatch": mismatch,
                **(identity_report(decoder) if check_identity else {})}  # fmt: skip

    def decode_profile(steps: int = 32, top: int = 15) -> dict:
        """GPU kernels of the 512 decoder's one-token step, as it runs (compiled, replayed as a CUDA graph): a
        request of 1 + `steps` new tokens less a request of 1 (the same prefill), under torch.profiler. Per token:
        kernel time and launches, the top kernels, and the wall time without the profiler."""
        decoder = one_cache(512)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]

        def kernels(new_tokens: int) -> dict:
            with torch.profiler.profile(activities=activities) as profiler:
                request(decoder, new_tokens)
                sync()
            return {e.key: (e.self_device_time_total, e.count) for e in profiler.key_averages()
                    if e.device_type == torch.autograd.DeviceType.CUDA}  # fmt: skip

        request(decoder, 1 + steps)  # untimed: captures the prompt width's prefill graph
        wall = request(decoder, 1 + steps)[2] - request(decoder, 1)[2]
        long, short = kernels(1 + steps), kernels(1)
        per_token = {key: ((us - short.get(key, (0, 0))[0]) / steps, (count - short.get(key, (0, 0))[1]) / steps)
                     for key, (us, count) in long.items()}  # fmt: skip
        ranked = sorted(per_token.items(), key=lambda item: item[1][0], reverse=True)
        return {"kernel_us_per_token": round(sum(us for us, _ in per_token.values()), 1),
                "kernels_per_token": round(sum(count for _, count in per_token.values()), 1),
                "ms_per_token": round(1e3 * wall / steps, 3),
                "top_kernels": [{"kernel": key[:100], "us_per_token": round(us, 1), "calls_per_token": round(count, 1)}
                                for key, (us, count) in ranked[:top]]}  # fmt: skip

    def on_cublas(run):
        """`run` with the one-token linear layers back on F.linear (cuBLAS), compiled anew, then the kernel back."""
        torch._dynamo.reset()  # nothing compiled for the kernel's layers is reused
        turned_off = use_gemv(model, enabled=False)
        try:
            return {**run(), "gemv_layers": 0, "gemv_layers_turned_off": turned_off}
        finally:
            if turned_off:
                use_gemv(model)

    def with_blas_library(name: str, run):
        """`run` with `name` as PyTorch's preferred BLAS library: the decoder compiles and captures its kernels."""
        previous = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(name)
        try:
            return {**run(), "blas_library": name}
        finally:
            torch.backends.cuda.preferred_blas_library(previous)

    configs = {
        "bf16-merged-fused": lambda: measure(model, tokenizer, single, args, warmups=1),
        "decode-profile-fused": decode_profile,
        "bf16-merged-graph": lambda: decoder_speed(lambda: app_backend().decoder),
        "bf16-merged-graph-app-default": lambda: decoder_speed(lambda: app_backend().decoder, reserve=args.app_max_new_tokens,
                                                               check_identity=False),
        "bf16-merged-graph-512": lambda: decoder_speed(lambda: one_cache(512), check_identity=False),
        "bf16-merged-graph-512-eager-prefill": lambda: decoder_speed(lambda: one_cache(512, EagerPrefillDecoder), check_identity=False),
        "bf16-merged-graph-512-cublas": lambda: on_cublas(lambda: decoder_speed(lambda: one_cache(512), check_identity=False)),
        "decode-profile-fused-cublas": lambda: on_cublas(decode_profile),
        "bf16-merged-graph-512-cublaslt": lambda: with_blas_library(
            "cublaslt", lambda: decoder_speed(lambda: one_cache(512), check_identity=False)),
    }  # fmt: skip
    for name, run in configs.items():
        if wanted(name):
            record(name, 1, guarded(run), cache="static", **details)

    def app_concurrent(make_backend, concurrent: int = args.concurrent) -> dict:
        """--concurrent requests at once through the backend `build()` returns, as app.py serves them: its queue
        lets the backend's concurrency answer at a time (one on the decoder, any other on generate()). Statement
        ends are ignored (random weights): each request runs to new_tokens, or EOS."""
        from concurrent.futures import ThreadPoolExecutor
        from threading import Semaphore

        building = time.perf_counter()
        backend = make_backend()
        build_s = time.perf_counter() - building
        gate = Semaphore(backend.concurrency)
        prompt = tokenizer.decode(single[0][0])

        def answer(_):
            start = time.perf_counter()  # from sending: the wait for a free slot is part of it
            with gate:
                chunks = sum(1 for _ in backend.stream(prompt, args.new_tokens))
            return time.perf_counter() - start, chunks

        never = lambda text: False  # noqa: E731
        with (mock.patch("starsql.serve.decode.statement_finished", never),
              mock.patch("starsql.serve.fast.decoder.statement_finished", never)):
            answer(0)  # warm-up: the first request on the decoder
            sync()
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrent) as pool:
                results = list(pool.map(answer, range(concurrent)))
            wall = time.perf_counter() - start
        latencies = sorted(t for t, _ in results)
        return {"tokens_per_s": round(concurrent * args.new_tokens / wall, 2), "wall_s": round(wall, 2),
                "build_s": round(build_s, 1),
                "per_stream_tokens_per_s": round(args.new_tokens / statistics.median(latencies), 2),
                "request_latency_median_s": round(statistics.median(latencies), 2), "request_latency_max_s": round(latencies[-1], 2),
                "app_concurrency": backend.concurrency, "chunks_streamed": sum(c for _, c in results)}  # fmt: skip

    def eager_prefill_backend() -> FastDecodeBackend:
        decoder = EagerPrefillDecoder(model, max_length=args.app_decoder_tokens)
        decoder.warm_up()
        return FastDecodeBackend(model, tokenizer, decoder)

    name = f"app-concurrent{args.concurrent}"
    if wanted(name):
        record(name, args.concurrent, guarded(lambda: app_concurrent(app_backend)), **details)
    if wanted(f"{name}-eager-prefill"):
        record(f"{name}-eager-prefill", args.concurrent, guarded(lambda: app_concurrent(eager_prefill_backend)), **details)
    batched = {}

    def batched_backend():
        """The batched backend app.py builds on a dedicated GPU (starsql.serve.fast.build), built once for all counts."""
        if "backend" not in batched:
            try:
                batched["backend"] = build(model, tokenizer, args.batch, compile=bool(args.batch_compile))
            finally:  # a failed build turns the kernel off; the configurations after it keep the app's model
                if details["gemv_layers"]:
                    use_gemv(model)
        return batched["backend"]

    for concurrent in sorted({1, 4, args.batch}):
        name = f"batched-concurrent{concurrent}"
        if wanted(name):
            record(name, concurrent, guarded(lambda: app_concurrent(batched_backend, concurrent)), **details)
    if wanted("batched-identity"):
        def batched_identity() -> dict:
            decoder = batched_backend().decoder
            reference = plain_tokens(model, identity)
            return {**identity_report(decoder, reference, together=True), "cache_length": decoder.max_length}

        record("batched-identity", len(identity), guarded(batched_identity), **details)
    batched.clear()
    del model
    free_memory()

    def fp32_batched_identity() -> dict:
        """The batched decoder on fp32 weights (prepared as the app prepares it, one bucket of all the identity
        prompts, compiled unless --batch_compile 0, and captured; its steps over the first prompt + new_tokens / 2
        positions, then over the whole slots), against plain generate() of the unfused fp32 model on cuBLAS: every
        prompt submitted at once with no prompt kept (prefilled whole, as with DECODE_PREFIXES=0), then one at a time,
        shortest first (each prefilled from past the one before), then all at once again (each kept whole)."""
        from transformers import AutoModelForCausalLM

        model32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device()).eval()
        reference = plain_tokens(model32, identity)
        from starsql.serve.fast import prepare_model

        prepare_model(model32)
        decoder = BatchedDecoder(model32, max_batch=len(identity), max_length=args.prompt_tokens + args.new_tokens + 8,
                                 buckets=(len(identity),), lengths=(args.prompt_tokens + args.new_tokens // 2,),
                                 compile=bool(args.batch_compile), prefixes=len(identity))  # fmt: skip
        def reused_share(run) -> tuple[dict, float]:  # a pass's report, and the share of its prompt tokens restored
            before = decoder.timings.snapshot()
            report = run()
            after = decoder.timings.snapshot()
            return report, round((after["reused_tokens"] - before["reused_tokens"]) / max(after["prompt_tokens"] - before["prompt_tokens"], 1), 3)

        store, decoder.prefixes = decoder.prefixes, None  # the first pass as with DECODE_PREFIXES=0: every prompt whole
        whole, whole_share = reused_share(lambda: identity_report(decoder, reference, together=True))
        decoder.prefixes = store  # still empty
        one_by_one, one_by_one_share = reused_share(lambda: identity_report(decoder, reference, shortest_first=True))
        kept, kept_share = reused_share(lambda: identity_report(decoder, reference, together=True))
        return {"dtype": "float32", **prepared_layers(model32), **whole, "whole_reused_share": whole_share,
                "one_by_one_identical": one_by_one["identity_prompts_identical"],
                "one_by_one_first_mismatches": one_by_one["identity_first_mismatches"], "one_by_one_reused_share": one_by_one_share,
                "kept_together_identical": kept["identity_prompts_identical"], "kept_together_reused_share": kept_share}  # fmt: skip

    if not args.skip_fp32 and wanted("fp32-batched-identity"):
        record("fp32-batched-identity", len(identity), guarded(fp32_batched_identity), cache="static")
        free_memory()

    def fp32_identity() -> dict:
        from transformers import AutoModelForCausalLM

        model32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device()).eval()
        reference = plain_tokens(model32, identity)  # transformers' own attention, q/k/v unfused, cuBLAS
        decoder = build(model32, tokenizer, 1, max_length=args.prompt_tokens + args.new_tokens + 8).decoder
        return {"dtype": "float32", **prepared_layers(model32), **decoder_graphs(decoder), **identity_report(decoder, reference)}

    if not args.skip_fp32 and wanted("fp32-identity"):
        record("fp32-identity", 1, guarded(fp32_identity), cache="static")

    print()
    print(table(records, ["config", "batch", "tokens_per_s", "per_stream_tokens_per_s", "ratio_to_baseline", "ttft_s",
                          "peak_mem_gib", "identical_to_bf16_merged", "identity_prompts_identical"]))  # fmt: skip
    for r in records:
        if r.get("error") or r.get("skipped"):
            print(f"  {r['config']}: {(r.get('error') or r.get('skipped')).splitlines()[0][:200]}")
    print(f"Total {time.perf_counter() - started:.0f} s on {gpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
