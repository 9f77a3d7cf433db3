"""Generation speed of StarCoder2-3B (random weights) + a random LoRA adapter, loaded the way the app and the
evaluation load it (starsql.generate.load_for_inference). One JSON line per configuration, then a table.

    python3 bench/generate_speed.py --out $OUT/generate.jsonl     # GPU, about 3-4 min (most of it compiling)
    python3 bench/generate_speed.py --smoke                       # CPU, tiny model, < 1 min

Configurations: ~300-token prompt, exactly 64 new tokens (min_new_tokens), greedy.
- 4bit-unmerged: 4-bit NF4 base + unmerged LoRA, one stream (the baseline; the issue saw 20.5 tok/s on an H200).
- bf16-merged: bf16 base with the adapter merged, one stream (the issue: 51.6 tok/s).
- bf16-merged-batch16: 16 concurrent requests, left-padded, one generate call: aggregate tokens/s.
- bf16-merged-static: static KV cache, compilation disabled (separates the cache's effect from the compiler's).
- bf16-merged-static-compile: static cache + transformers' automatic torch.compile (mode reduce-overhead,
  CUDA graphs), warmed up twice; its greedy tokens are compared with bf16-merged's on the same prompt.
- bf16-merged-graph (run after the fusion below): the app's decoder (starsql.generate.GreedyDecoder): static cache, the one-token step
  compiled and captured as one CUDA graph, argmax inside it. Its tokens are compared with plain generate on
  the timed prompt and on --identity_prompts more prompts, in bf16 and (fp32-identity) with fp32 weights,
  where kernel rounding differences are ~2^16 times smaller: a logic bug would show there too, a rounding
  tie would not. It runs with the app's settings (--app_decoder_tokens 4096: caches of 512, 1024, 2048 and
  4096 positions, the shortest that holds the request is used).
- bf16-merged-graph-app-default: the same, with room for the app's default 256 new tokens (the 1,024 cache);
  the first new_tokens of them timed.
- bf16-merged-graph-4096: the same decoder with one 4,096-position cache (the app before cache lengths).
- bf16-merged-graph-cdt / -autotune: one cache that just fits, compiled with Inductor's coordinate-descent
  tuning, and with max-autotune matmul templates as well.
- bf16-merged-graph-short, -freezing, -gqa, -gqa-freezing: one cache that just fits; Inductor's freezing (weights
  as constants; meant to fold q/k/v into one matmul, which did not happen on the H100), attention as matmuls on the shared K/V heads (attn_implementation
  "starsql_gqa"), and both.
- decode-profile(-gqa): the compiled step without its CUDA graph, under torch.profiler: kernel time and launches
  per token, and the top kernels.
Then q/k/v are fused into one projection (starsql.generate.fuse_qkv_projections, as load_for_inference does for
the app; the fused attention also decodes through starsql.generate.grouped_query_attention), and:
bf16-merged-fused (plain generate), bf16-merged-graph-fused-short / decode-profile-fused against their unfused runs
above, then the app's settings (bf16-merged-graph, -app-default, app-concurrent16) and levers on the app's decoder
for this request (its 512 cache): -512-eager-prefill (the prompt's forward eager and unpadded: the decoder before
prefill graphs), -512-cublas (one-token linear layers on cuBLAS, not starsql.gemv's Triton kernel: the decoder
before it), -512-cublaslt (cuBLASLt's matrix-vector kernels), -512-synced (the host reads each token before
the next step is queued: the loop before it queued ahead), -512 / -384 (one cache of that length),
-512/-384-linreduce3072 (o_proj and c_proj as Inductor reductions), -512-linreduce(-cdt) (every linear layer of the step as an Inductor reduction, and with
coordinate-descent tuning). fp32-identity compares the fused decoder (with the gemv kernel on a GPU) with plain
generate of the unfused fp32 model (cuBLAS). gemv-shapes times the kernel against cuBLAS alone, per weight shape;
decode-profile-fused(-cublas) profiles the app's step with the kernel (and without).
- app-concurrent16: 16 requests at once through the app's streaming path (stream_sql + the decoder), at most
  --app_concurrency running (app.py: 1 with the decoder): aggregate tokens/s and request latency.
  app-concurrent16-eager-prefill: the same with the prompt's forward eager (the decoder before prefill graphs).
tokens_per_s = new tokens / wall time of the whole generate call (prefill included); ttft_s = time to the
first new token (prefill + 1 token), taken in the same calls.
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

from common import (
    LORA_TARGETS, card, device, emit, ensure_model, examples, free_memory, peak_gib, peak_reserved_gib, ratio, sync,
    table,
)  # fmt: skip

ISSUE_H200 = {"4bit-unmerged": 20.5, "bf16-merged": 51.6}  # tok/s the issue reports, for orientation only
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


def prompt_batch(tokenizer, batch: int, length: int):
    """`batch` real prompts (the repo's, concatenated to `length` tokens, then shortened by 8 tokens per row so
    that the batch needs left padding), left-padded: (input_ids, attention_mask)."""
    ids = []
    for e in examples():
        ids += tokenizer(e["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) >= length + 8 * batch:
            break
    rows = [ids[8 * i : 8 * i + length - 8 * i] for i in range(batch)]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids.to(device()), attention_mask.to(device())


def measure(model, tokenizer, inputs, args, warmups: int) -> dict:
    """Median of `args.repeats` timed generate calls after `warmups` untimed ones."""
    from transformers import LogitsProcessorList

    from starsql.generate import _generation_kwargs

    input_ids, attention_mask = inputs
    kwargs = _generation_kwargs(tokenizer, args.new_tokens)  # the app's greedy settings
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


def register_attention():
    """attn_implementation "starsql_gqa" for the unfused model: its one-token steps through
    starsql.generate.grouped_query_attention (what the fused model, the app's, always uses), with
    transformers' eager masks (always a 4-D additive mask, never None); SDPA for the prefill."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from starsql.generate import grouped_query_attention

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[2] != 1 or module.training:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return grouped_query_attention(query, key, value, attention_mask, module.scaling if scaling is None else scaling), None

    AttentionInterface.register("starsql_gqa", attention)
    AttentionMaskInterface.register("starsql_gqa", eager_mask)


@contextlib.contextmanager
def linear_as_reduction(out_features: int | None = None):
    """nn.Linear on one row as a product and a sum (not a cuBLAS GEMV): Inductor makes it one reduction
    kernel with the bias, the GELU or the residual add fused in, and no split-K reduction kernel after it.
    For the decoder's compiled step (traced while this is on); longer inputs keep F.linear. `out_features`:
    only the layers with that many outputs (3072: o_proj and c_proj, where cuBLAS splits K)."""
    original = torch.nn.Linear.forward

    def forward(self, x):
        if x.shape[:-1].numel() != 1 or out_features not in (None, self.out_features):
            return original(self, x)
        out = (x.unsqueeze(-2).float() * self.weight.float()).sum(-1)
        return (out if self.bias is None else out + self.bias.float()).to(x.dtype)

    torch.nn.Linear.forward = forward
    try:
        yield
    finally:
        torch.nn.Linear.forward = original


@contextlib.contextmanager
def cublas_linears(model):
    """The model's linear layers back on F.linear (cuBLAS) for one token, not starsql.gemv's kernel."""
    from starsql.gemv import use_gemv

    changed = use_gemv(model, enabled=False)
    try:
        yield changed
    finally:
        if changed:
            use_gemv(model)


# Block shapes swept per weight shape by gemv-shapes (rows per program, columns per loop step, warps, stages).
GEMV_SWEEP = [
    (1, 1024, 4, 3), (2, 512, 4, 3), (2, 1024, 4, 3), (4, 256, 4, 4), (4, 512, 4, 3), (4, 1024, 4, 2),
    (4, 1024, 8, 3), (8, 256, 4, 4), (8, 512, 4, 3), (8, 512, 8, 3), (16, 256, 4, 3), (16, 256, 8, 4),
    (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (64, 128, 8, 3),
]


def gemv_shapes(model, dtype=torch.bfloat16) -> dict:
    """Each weight shape of the model's linear layers, one token: cuBLAS (F.linear, and GELU for c_fc) against
    starsql.gemv's kernel with its fixed block shape and with the best of GEMV_SWEEP, timed alone by
    triton.testing.do_bench (median, L2 flushed between calls, as a decoding step reads each weight from
    memory), with the weight bytes read per microsecond (GB/s); and the custom op called eagerly, whose host
    time (it runs in the decoder's CUDA graphs, without it) exceeds the small layers' kernel time."""
    import torch.nn.functional as F
    import triton.testing

    from starsql import gemv

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
            config = dict(zip(("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), shape))
            sweep[shape] = time_it(lambda: gemv.launch(x, weight, bias, out, gelu, config=config))
        best = min(sweep, key=sweep.get)
        times = {"cublas": time_it(cublas), "gemv": time_it(kernel), "best": sweep[best], "op": time_it(op)}
        gigabytes = n * k * weight.element_size() / 1e9
        rows.append({"layer": layer, "shape": [n, k], "gelu": gelu, "cublas_us": round(1e3 * times["cublas"], 2),
                     "gemv_us": round(1e3 * times["gemv"], 2), "speedup": round(times["cublas"] / times["gemv"], 3),
                     "cublas_gb_s": round(gigabytes / times["cublas"] * 1e3), "gemv_gb_s": round(gigabytes / times["gemv"] * 1e3),
                     "gemv_block": {**gemv.BLOCK, **gemv.LAUNCH}, "best_sweep_us": round(1e3 * times["best"], 2),
                     "op_eager_us": round(1e3 * times["op"], 2),
                     "best_sweep_block": dict(zip(("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), best)),
                     "max_abs_diff": error})  # fmt: skip
    return {"shapes": rows}


@contextlib.contextmanager
def blas_library(name: str):
    """PyTorch's preferred BLAS library ("cublas", "cublaslt") while the step is compiled and captured."""
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


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
    parser.add_argument("--batch", type=int, default=16, help="Concurrent requests of the batched config.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed generate calls per config (median).")
    parser.add_argument("--compile_cpu", action="store_true", help="Compile on CPU too (slow; tests the wiring).")
    parser.add_argument("--skip_compile", action="store_true", help="Leave out the torch.compile config.")
    parser.add_argument("--identity_prompts", type=int, default=8, help="Prompts whose greedy tokens are compared.")
    parser.add_argument("--skip_fp32", action="store_true", help="Leave out the fp32 token-identity check.")
    parser.add_argument("--app_decoder_tokens", type=int, default=4096, help="app.py's DECODER_TOKENS.")
    parser.add_argument("--app_max_new_tokens", type=int, default=256, help="app.py's DEFAULT_NEW_TOKENS.")
    parser.add_argument("--concurrent", type=int, default=16, help="Requests sent at once to the app's streaming path.")
    parser.add_argument("--app_concurrency", type=int, default=1, help="Answers at once: app.py's generation_concurrency (1 with the decoder; 2 before).")
    parser.add_argument("--only", default="", help="Comma-separated configs to run (the baseline and bf16-merged always run).")
    args = parser.parse_args(argv)
    if args.smoke and args.model_dir == parser.get_default("model_dir"):
        args.model_dir = "/tmp/sc2-smoke-random"
    from starsql.generate import load_for_inference

    started = time.perf_counter()
    model_dir = ensure_model(args.model_dir, smoke=args.smoke)
    adapter_dir = ensure_adapter(model_dir, Path(args.adapter_dir or f"{args.model_dir}-lora"))
    gpu = card()
    records = []

    def record(name: str, batch: int, result: dict, **details):
        line = {"card": gpu, "config": name, "batch": batch, "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens, **details, **result}  # fmt: skip
        line.setdefault("peak_mem_gib", peak_gib())
        line.setdefault("peak_reserved_gib", peak_reserved_gib())
        baseline = next((r for r in records if r["config"] == BASELINE), {})
        line["ratio_to_baseline"] = ratio(line.get("tokens_per_s"), baseline.get("tokens_per_s"))
        line["baseline"] = BASELINE
        if name in ISSUE_H200:
            line["issue_h200_tokens_per_s"] = ISSUE_H200[name]
        emit({k: v for k, v in line.items() if k != "new_token_ids"}, args.out)
        records.append(line)
        return line

    # 1. The baseline: 4-bit base, LoRA kept as separate layers (what a QLoRA adapter on a 4-bit base runs as).
    def four_bit() -> dict:
        loaded = time.perf_counter()
        model, tokenizer = load_for_inference(str(model_dir), str(adapter_dir), load_in_4bit=True)
        details = {"dtype": f"nf4/{dtype_name(model)}", "load_s": round(time.perf_counter() - loaded, 1)}
        return {**details, **measure(model, tokenizer, prompt_batch(tokenizer, 1, args.prompt_tokens), args, warmups=1)}

    record(BASELINE, 1, guarded(four_bit), merged=False)
    free_memory()

    # 2-5. bf16 with the adapter merged: the app's default on a GPU.
    loaded = time.perf_counter()
    model, tokenizer = load_for_inference(str(model_dir), str(adapter_dir), fuse_qkv=False, gemv=False)  # both below
    details = {"dtype": dtype_name(model), "merged": True, "load_s": round(time.perf_counter() - loaded, 1)}
    single = prompt_batch(tokenizer, 1, args.prompt_tokens)
    batched = prompt_batch(tokenizer, args.batch, args.prompt_tokens)
    plain = record("bf16-merged", 1, guarded(lambda: measure(model, tokenizer, single, args, warmups=1)), **details)
    wanted = lambda name: not args.only or name in args.only.split(",")  # noqa: E731
    if wanted(f"bf16-merged-batch{args.batch}"):
        concurrent = guarded(lambda: measure(model, tokenizer, batched, args, warmups=1))
        record(f"bf16-merged-batch{args.batch}", args.batch, concurrent, left_padded=True, **details)

    def static(compile_: bool) -> dict:
        from transformers import CompileConfig

        model.generation_config.cache_implementation = "static"
        model.generation_config.disable_compile = not compile_
        # transformers compiles the decoding forward by itself when the cache is static (on CUDA); the
        # default CompileConfig is mode="reduce-overhead" (CUDA graphs), fullgraph=False.
        model.generation_config.compile_config = CompileConfig() if compile_ else None
        if compile_ and args.compile_cpu:
            model.generation_config.compile_config._compile_all_devices = True
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        result = measure(model, tokenizer, single, args, warmups=2 if compile_ else 1)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        mismatch = first_mismatch(result["new_token_ids"], plain.get("new_token_ids", []))
        return {**result, "compiled": graphs > 0, "identical_to_bf16_merged": mismatch is None,
                "first_mismatch": mismatch}  # fmt: skip

    if wanted("bf16-merged-static"):
        record("bf16-merged-static", 1, guarded(lambda: static(False)), cache="static", **details)
    if args.skip_compile or not wanted("bf16-merged-static-compile"):
        record("bf16-merged-static-compile", 1, {"skipped": "--skip_compile or not in --only"})
    elif torch.cuda.is_available() or args.compile_cpu:
        record("bf16-merged-static-compile", 1, guarded(lambda: static(True)), cache="static", **details)
    else:
        record("bf16-merged-static-compile", 1, {"skipped": "transformers compiles generation only on accelerators"})

    def plain_tokens(model_, prompts) -> list[list[int]]:
        """Plain generate (dynamic cache, eager), greedy, stopping at EOS like the decoder (no min_new_tokens)."""
        from starsql.generate import _generation_kwargs

        model_.generation_config.cache_implementation = None
        model_.generation_config.disable_compile = True
        outputs = []
        for input_ids, attention_mask in prompts:  # F.linear: starsql.gemv's kernel runs only in the decoder
            out = model_.generate(input_ids=input_ids, attention_mask=attention_mask, **_generation_kwargs(tokenizer, args.new_tokens))
            new = out[0, input_ids.shape[1] :].tolist()
            outputs.append(new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new)
        return outputs

    identity = [prompt_batch(tokenizer, 1, args.prompt_tokens - 24 * i) for i in range(1, args.identity_prompts + 1)]

    references = {}

    def plain_reference(model_) -> list[list[int]]:
        """Plain generate's tokens on the identity prompts, once per model and q/k/v fusion, with the
        attention the model was loaded with (with_attention takes it before switching)."""
        key = (id(model_), sum(hasattr(m, "qkv_proj") for m in model_.modules()))
        if key not in references:
            references[key] = plain_tokens(model_, identity)
        return references[key]

    def identity_report(decoder, model_, reference=None) -> dict:
        """The decoder's greedy tokens against plain generate's (or `reference`) on the identity prompts."""
        decoded = [list(decoder.tokens(ids, args.new_tokens, tokenizer.eos_token_id)) for ids, _ in identity]
        reference = reference or plain_reference(model_)
        mismatches = [first_mismatch(a, b) for a, b in zip(decoded, reference)]
        return {"identity_prompts_identical": sum(m is None for m in mismatches), "identity_prompts": len(mismatches),
                "identity_first_mismatches": mismatches}  # fmt: skip

    def graphed(max_length: int, lengths=(512, 1024, 2048), compile_options=None, check_identity=True,
                reserve: int | None = None, synced: bool = False, trace=contextlib.nullcontext,
                eager_prefill: bool = False) -> dict:
        """`reserve`: max_new_tokens as the request asks (it picks the cache); new_tokens of them are timed.
        `synced`: the host reads each token before the next step is queued (the decoder's loop before
        it queued ahead, as it still runs on a CPU). `trace`: a context the step is compiled and captured in.
        `eager_prefill`: the prompt's forward runs eagerly, unpadded (the decoder before prefill graphs)."""
        from starsql.generate import GreedyDecoder

        decoder = GreedyDecoder(model, max_length=max_length, lengths=lengths, compile_options=compile_options)
        decoder.queue_ahead = decoder.queue_ahead and not synced
        if eager_prefill:
            decoder.graph_prefill = decoder.pad_prefill = False
        compiled = time.perf_counter()
        with trace():
            decoder.warm_up()  # compiles and captures every cache length, as the app does at start-up
        compile_s = time.perf_counter() - compiled
        times, ttfts = [], []
        for _ in range(args.repeats + 1):
            sync()
            start = time.perf_counter()
            new, first = [], None
            stream = decoder.tokens(single[0], reserve or args.new_tokens)  # no EOS: runs to max_new_tokens
            for token in stream:
                first = first or time.perf_counter()
                new.append(token)
                if len(new) == args.new_tokens:
                    break
            stream.close()
            times.append(time.perf_counter() - start)
            ttfts.append(first - start)
        times, ttfts = times[1:], ttfts[1:]  # the first run after capture is a warm-up
        seconds = statistics.median(times)
        mismatch = first_mismatch(new, plain.get("new_token_ids", []))
        used = decoder.last_cache_length
        return {"tokens_per_s": round(len(new) / seconds, 2), "per_stream_tokens_per_s": round(len(new) / seconds, 2),
                "time_s": round(seconds, 3), "ttft_s": round(statistics.median(ttfts), 4), "times_s": [round(t, 3) for t in times],
                "compile_and_capture_s": round(compile_s, 1), "new_token_ids": new,
                "cuda_graph": all(s.graph is not None for s in decoder.caches) and decoder.use_graph,
                "prefill_graph_widths": sorted(w for s in decoder.caches for w in s.prefill_graphs),
                "cache_lengths": [s.length for s in decoder.caches], "cache_length_used": used,
                "compile_options": compile_options, "identical_to_bf16_merged": mismatch is None, "first_mismatch": mismatch,
                **(identity_report(decoder, model) if check_identity else {})}  # fmt: skip

    short = args.prompt_tokens + args.new_tokens + 8

    def lever(run):
        """A lever that changes what the step traces: forget earlier compiles first (their guards may not
        see a patched nn.Linear), so it compiles anew."""
        torch._dynamo.reset()
        return run()

    def with_attention(name: str, run):
        if args.identity_prompts:
            plain_reference(model)  # with the model's own attention
        register_attention()
        previous = model.config._attn_implementation
        model.set_attn_implementation(name)
        try:
            return {**run(), "attn_implementation": name}
        finally:
            model.set_attn_implementation(previous)

    def decode_profile(steps: int = 32, top: int = 15) -> dict:
        """GPU kernels of `steps` decode steps (prefill excluded): time and launches per token, top kernels."""
        from starsql.generate import GreedyDecoder

        decoder = GreedyDecoder(model, max_length=short, lengths=())
        decoder.use_graph = decoder.graph_prefill = False  # the compiled step's kernels one by one (the graph hides them)
        decoder.warm_up()
        slot = decoder.caches[0]
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.inference_mode():
            for profiled in (False, True):  # a warm pass timed without the profiler, then the profiled one
                decoder._prefill(slot, single[0])
                sync()
                start = time.perf_counter()
                with torch.profiler.profile(activities=activities) if profiled else contextlib.nullcontext() as profiler:
                    for index in range(steps):
                        token = decoder._advance(slot)
                    sync()
                if not profiled:
                    unprofiled = time.perf_counter() - start
        events = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        events.sort(key=lambda e: e.self_device_time_total, reverse=True)
        total = sum(e.self_device_time_total for e in events)
        return {"kernel_us_per_token": round(total / steps, 1), "kernels_per_token": round(sum(e.count for e in events) / steps, 1),
                "no_graph_ms_per_token": round(1e3 * unprofiled / steps, 3),
                "top_kernels": [{"kernel": e.key[:100], "us_per_token": round(e.self_device_time_total / steps, 1),
                                 "calls_per_token": round(e.count / steps, 1)} for e in events[:top]]}  # fmt: skip

    graph_configs = {
        # The app before cache lengths: every token attends over a 4,096-position cache.
        "bf16-merged-graph-4096": lambda: graphed(args.app_decoder_tokens, lengths=(), check_identity=False),
        # Inductor tuning on a cache that just fits: coordinate descent over the Triton kernels' block
        # sizes, and also autotuned matmul templates (M=1 GEMVs) against cuBLAS.
        "bf16-merged-graph-cdt": lambda: graphed(short, lengths=(), compile_options={"coordinate_descent_tuning": True},
                                                 check_identity=False),
        "bf16-merged-graph-autotune": lambda: graphed(short, lengths=(), check_identity=False,
                                                      compile_options={"max_autotune": True, "coordinate_descent_tuning": True}),
        # Same cache (one that just fits) for the levers below and their baseline.
        "bf16-merged-graph-short": lambda: graphed(short, lengths=(), check_identity=False),
        # Inductor's freezing: weights become constants; its pass that concatenates linears sharing an input
        # (q/k/v) did not fire on the H100 run (no faster).
        "bf16-merged-graph-freezing": lambda: graphed(short, lengths=(), compile_options={"freezing": True}),
        # Attention as matmuls on the shared K/V heads (grouped_query_attention below), not SDPA over K/V
        # repeated to all 24 query heads.
        "bf16-merged-graph-gqa": lambda: with_attention("starsql_gqa", lambda: graphed(short, lengths=())),
        "bf16-merged-graph-gqa-freezing": lambda: with_attention(
            "starsql_gqa", lambda: graphed(short, lengths=(), compile_options={"freezing": True})),
        # Where a token's GPU time goes: the compiled step run without its CUDA graph, under torch.profiler.
        "decode-profile": lambda: decode_profile(),
        "decode-profile-gqa": lambda: with_attention("starsql_gqa", decode_profile),
    }

    for name, run in graph_configs.items():
        if wanted(name):
            record(name, 1, guarded(run), cache="static", **details)

    # The app's model: q/k/v fused into one projection (load_for_inference's default), then the app's settings.
    from starsql.gemv import gemv_available, use_gemv
    from starsql.generate import fuse_qkv_projections

    details["fused_qkv_layers"] = fuse_qkv_projections(model)
    # and (load_for_inference's default on a GPU) one-token linear layers through starsql.gemv's kernel.
    details["gemv_layers"] = use_gemv(model) if gemv_available(model) else 0
    if details["gemv_layers"] and wanted("gemv-shapes"):
        record("gemv-shapes", 1, guarded(lambda: gemv_shapes(model)), **details)
    fused_configs = {
        "bf16-merged-fused": lambda: measure(model, tokenizer, single, args, warmups=1),  # plain generate
        "bf16-merged-graph-fused-short": lambda: graphed(short, lengths=()),
        "decode-profile-fused": lambda: decode_profile(),
        # What the app runs: caches of 512..4096 positions, the shortest that holds the request.
        "bf16-merged-graph": lambda: graphed(args.app_decoder_tokens),
        # The app's default request: room for 256 new tokens, so a 300-token prompt takes the 1,024 cache.
        "bf16-merged-graph-app-default": lambda: graphed(args.app_decoder_tokens, check_identity=False,
                                                         reserve=args.app_max_new_tokens),
        # Levers on the app's decoder for this request (its 512 cache), one at a time. The prompt's forward
        # eager and unpadded (before prefill graphs):
        "bf16-merged-graph-512-eager-prefill": lambda: graphed(512, lengths=(), check_identity=False, eager_prefill=True),
        # cuBLAS's matrix-vector kernels, not starsql.gemv's (the decoder before it): against -512 below.
        "bf16-merged-graph-512-cublas": lambda: lever(lambda: cublas_config(lambda: graphed(512, lengths=(), check_identity=False))),
        "decode-profile-fused-cublas": lambda: lever(lambda: cublas_config(decode_profile)),
        # cuBLASLt's kernels for the step's matrix-vector products instead of cuBLAS's (PyTorch's default).
        "bf16-merged-graph-512-cublaslt": lambda: graphed(512, lengths=(), check_identity=False,
                                                          trace=lambda: blas_library("cublaslt")),
        # The app's decoder for this request with one 512 cache (the baseline of the levers below), with one
        # 384 cache (fewer positions to attend over), and o_proj/c_proj (where cuBLAS splits K) as Inductor
        # reductions, alone and with the 384 cache.
        "bf16-merged-graph-512": lambda: graphed(512, lengths=(), check_identity=False),
        "bf16-merged-graph-384": lambda: graphed(384, lengths=(), check_identity=False),
        "bf16-merged-graph-512-linreduce3072": lambda: lever(lambda: graphed(
            512, lengths=(), check_identity=False, trace=lambda: linear_as_reduction(3072))),
        "bf16-merged-graph-384-linreduce3072": lambda: lever(lambda: graphed(
            384, lengths=(), check_identity=False, trace=lambda: linear_as_reduction(3072))),
        # The loop before it queued the next step ahead of reading a token:
        "bf16-merged-graph-512-synced": lambda: graphed(512, lengths=(), check_identity=False, synced=True),
        # Every linear layer of the step as an Inductor reduction (no cuBLAS GEMV, no split-K), without and
        # with Inductor's coordinate-descent tuning of its block sizes.
        "bf16-merged-graph-512-linreduce": lambda: lever(lambda: graphed(512, lengths=(), trace=linear_as_reduction)),
        "bf16-merged-graph-512-linreduce-cdt": lambda: lever(lambda: graphed(
            512, lengths=(), trace=linear_as_reduction, compile_options={"coordinate_descent_tuning": True})),
    }
    def cublas_config(run):
        with cublas_linears(model) as turned_off:
            return {**run(), "gemv_layers": 0, "gemv_layers_turned_off": turned_off}

    for name, run in fused_configs.items():
        if wanted(name):
            record(name, 1, guarded(run), cache="static", **details)

    def app_concurrent(eager_prefill: bool = False) -> dict:
        """`--concurrent` requests at once through the app's streaming path (stream_sql with the
        decoder), at most `--app_concurrency` running (app.py's generation_concurrency): one holds the
        decoder, any other uses generate(). Each runs to exactly new_tokens (statement ends ignored)."""
        from concurrent.futures import ThreadPoolExecutor
        from threading import Semaphore

        import starsql.generate as gen

        decoder = gen.GreedyDecoder(model, max_length=args.app_decoder_tokens)
        if eager_prefill:  # the decoder before prefill graphs
            decoder.graph_prefill = decoder.pad_prefill = False
        decoder.warm_up()
        gate = Semaphore(args.app_concurrency)
        prompt = tokenizer.decode(single[0][0])
        finished = gen.statement_finished
        gen.statement_finished = lambda text: False  # random weights: run every request to new_tokens

        def request(_):
            start = time.perf_counter()  # from sending: the wait for a free slot is part of it
            with gate:
                chunks = sum(1 for _ in gen.stream_sql(model, tokenizer, prompt, max_new_tokens=args.new_tokens, decoder=decoder))
            return time.perf_counter() - start, chunks

        try:
            request(0)  # warm-up: the decoder path's first request
            sync()
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrent) as pool:
                results = list(pool.map(request, range(args.concurrent)))
            wall = time.perf_counter() - start
        finally:
            gen.statement_finished = finished
        latencies = sorted(t for t, _ in results)
        return {"tokens_per_s": round(args.concurrent * args.new_tokens / wall, 2), "wall_s": round(wall, 2),
                "per_stream_tokens_per_s": round(args.new_tokens / statistics.median(latencies), 2),
                "request_latency_median_s": round(statistics.median(latencies), 2), "request_latency_max_s": round(latencies[-1], 2),
                "app_concurrency": args.app_concurrency, "chunks_streamed": sum(c for _, c in results)}  # fmt: skip

    if wanted(f"app-concurrent{args.concurrent}"):
        record(f"app-concurrent{args.concurrent}", args.concurrent, guarded(app_concurrent), **details)
    if wanted(f"app-concurrent{args.concurrent}-eager-prefill"):
        record(f"app-concurrent{args.concurrent}-eager-prefill", args.concurrent,
               guarded(lambda: app_concurrent(eager_prefill=True)), **details)
    del model
    free_memory()

    def fp32_identity() -> dict:
        from transformers import AutoModelForCausalLM

        from starsql.generate import GreedyDecoder

        model32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device()).eval()
        reference = plain_tokens(model32, identity)  # transformers' own attention, q/k/v unfused
        fuse_qkv_projections(model32)
        gemv_layers = use_gemv(model32) if gemv_available(model32) else 0  # as load_for_inference does
        decoder = GreedyDecoder(model32, max_length=args.prompt_tokens + args.new_tokens + 8)
        report = identity_report(decoder, model32, reference)
        return {"dtype": "float32", "fused_qkv": True, "gemv_layers": gemv_layers, "cuda_graph": decoder.caches[0].graph is not None and decoder.use_graph, **report}

    if not args.skip_fp32 and wanted("fp32-identity"):
        record("fp32-identity", 1, guarded(fp32_identity), cache="static")

    print()
    print(table(records, ["config", "batch", "tokens_per_s", "per_stream_tokens_per_s", "ratio_to_baseline", "ttft_s",
                          "peak_mem_gib", "issue_h200_tokens_per_s", "identical_to_bf16_merged",
                          "identity_prompts_identical"]))  # fmt: skip
    for r in records:
        if r.get("error") or r.get("skipped"):
            print(f"  {r['config']}: {(r.get('error') or r.get('skipped')).splitlines()[0][:200]}")
    print(f"Total {time.perf_counter() - started:.0f} s on {gpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
