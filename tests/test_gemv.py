"""starsql.serve.fast.gemv: the Triton kernels for decoding (one row; a few rows), and the layers that route to them.

On a CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1), which must be set before Triton
is imported: those checks run in a subprocess (this file run as a script). On a GPU they run compiled.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(37, 200), (5, 3), (64, 64)]  # rows and columns that blocks do and do not divide


def check_kernel(device: str):
    """The op (the shipped block shape) and other block shapes, with and without bias and GELU, in fp32 and
    bf16: F.linear's result (and GELU's); in fp16, GELU of the linear output rounded first, as unfused; the
    op's fake (torch.compile's view of it) agrees with the real one (torch.library.opcheck)."""
    import torch
    import torch.nn.functional as F

    from starsql.serve.fast import gemv

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        # fp32: the same sums in another order. bf16: the interpreter rounds fp32 to bf16 by truncation,
        # one unit in the last place where the GPU rounds to nearest.
        tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-6, atol=2**-5)
        for rows, cols in SHAPES:
            weight = (torch.randn(rows, cols, device=device) / cols**0.5).to(dtype)
            x = torch.randn(1, 1, cols, device=device, dtype=dtype)
            for bias in (torch.randn(rows, device=device, dtype=dtype), None):
                for gelu in (False, True):
                    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
                    if gelu:
                        expected = F.gelu(expected.to(dtype).float(), approximate="tanh")
                    out = torch.full((1, 1, rows), float("nan"), device=device, dtype=dtype)
                    gemv.launch(x, weight, bias, out, gelu)  # into a given output, as the op calls it
                    torch.testing.assert_close(out.float(), expected, **tolerance)
                    out = torch.ops.starsql.gemv(x, weight, bias, gelu)  # the op, the shipped block shape
                    torch.testing.assert_close(out.float(), expected, **tolerance)
                    if (rows, cols) == SHAPES[0]:  # the fake's checks do not depend on the shape: one is enough
                        torch.library.opcheck(torch.ops.starsql.gemv.default, (x, weight, bias, gelu))
    # GELU sees the linear output rounded to the model's dtype, as the unfused layers give it. fp16: the
    # interpreter rounds to nearest there. Without the rounding about 30% of these outputs differ by an ulp.
    rows, cols = 2048, 64
    weight = (torch.randn(rows, cols, device=device) / cols**0.5).half()
    x, bias = torch.randn(1, 1, cols, device=device).half(), torch.randn(rows, device=device).half()
    unfused = F.gelu(F.linear(x.float(), weight.float(), bias.float()).half().float(), approximate="tanh").half()
    same = (torch.ops.starsql.gemv(x, weight, bias, True) == unfused).float().mean().item()
    assert same > 0.95, f"only {same:.0%} of GELU outputs equal the unfused layers'"


def check_rows_kernel(device: str):
    """The op on 2 to gemv.ROWS rows (the rows kernel, the shipped block shape, blocks partly masked) computes
    F.linear (and its GELU) for each row, in fp32 and bf16, as the same row alone does up to rounding; its fake
    agrees; more rows are refused, with the limit in the message."""
    import torch
    import torch.nn.functional as F

    from starsql.serve.fast import gemv

    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-6, atol=2**-5)
        for (rows, cols), batch in zip(SHAPES + [(40, 300)], (2, 5, gemv.ROWS, 3)):
            weight = (torch.randn(rows, cols, device=device) / cols**0.5).to(dtype)
            x = torch.randn(batch, 1, cols, device=device, dtype=dtype)
            for bias in (torch.randn(rows, device=device, dtype=dtype), None):
                for gelu in (False, True):
                    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
                    if gelu:
                        expected = F.gelu(expected.to(dtype).float(), approximate="tanh")
                    out = torch.ops.starsql.gemv(x, weight, bias, gelu)
                    assert out.shape == (batch, 1, rows) and out.dtype == dtype
                    torch.testing.assert_close(out.float(), expected, **tolerance)
                    alone = torch.ops.starsql.gemv(x[1:2], weight, bias, gelu)  # one row: the matrix-vector kernel
                    torch.testing.assert_close(out[1:2].float(), alone.float(), **tolerance)
                    if (rows, cols) == SHAPES[0]:
                        torch.library.opcheck(torch.ops.starsql.gemv.default, (x, weight, bias, gelu))
    weight = torch.randn(8, 16, device=device)
    try:
        torch.ops.starsql.gemv(torch.randn(gemv.ROWS + 1, 16, device=device), weight, None, False)
    except ValueError as error:
        assert f"at most {gemv.ROWS} rows" in str(error)
    else:
        raise AssertionError("more rows than the rows kernel takes went through it")


PROMPTS = [("CREATE TABLE singer (name VARCHAR, age INTEGER)", "Names of singers older than 30?"),
           ("CREATE TABLE a (x INTEGER)", "How many rows?"), ("CREATE TABLE t (id INTEGER, y TEXT)", "List every y.")]


def chaotic_tiny_model(device: str, prompts: list[tuple[str, str]]):
    """The tiny model in fp32 (on a GPU too: rounding differences far below the logits' gaps) with large random
    weights and q/k/v fused, and the token ids of `prompts` (schema, question)."""
    import torch

    from starsql.prompt import build_prompt
    from starsql.serve.fast.fused_qkv import fuse_qkv_projections
    from starsql.serve.load import load_for_inference

    model, tokenizer = load_for_inference("tiny-starcoder2", device=device)
    model.float()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    fuse_qkv_projections(model)
    ids = [tokenizer(build_prompt(*p), return_tensors="pt", add_special_tokens=False)["input_ids"].to(device) for p in prompts]
    return model, ids


def check_decoding_through_the_kernel(device: str):
    """The tiny model (large random weights, fp32) decodes the same greedy tokens with every linear layer
    fed one token routed through the kernel as with F.linear, and the kernel really ran."""
    import torch

    from starsql.serve.fast import gemv
    from starsql.serve.fast.decoder import GreedyDecoder

    model, ids = chaotic_tiny_model(device, PROMPTS[:2])
    expected = [list(GreedyDecoder(model, max_length=256, compile=False).tokens(i, 24)) for i in ids]
    calls = []
    kernel = gemv.gemv_kernel.run
    gemv.gemv_kernel.run = lambda *a, **k: (calls.append(k["GELU"]), kernel(*a, **k))[1]
    assert gemv.use_gemv(model) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.inference_mode():
        model(ids[0][:, :1])  # one token outside the decoder: F.linear (eager, the custom op costs more host time)
    assert calls == []
    # As the app runs it: the step compiled (fullgraph, through the op's fake) and, on a GPU, captured.
    decoder = GreedyDecoder(model, max_length=256, compile=True)
    got = [list(decoder.tokens(i, 24)) for i in ids]
    assert got == expected and expected[0] != expected[1]
    layers = model.config.num_hidden_layers
    # A step: q/k/v, o, c_fc with its GELU and c_proj per layer, then the head; the prefill keeps F.linear
    # but for the last token's head. On a CPU each of the 2 x 23 steps calls the kernel from Python; on a GPU
    # the step's CUDA graph replays the launches its capture recorded: only warm-ups and captures call it.
    steps = 2 * 23 if device == "cpu" else 1
    assert calls.count(True) >= layers * steps and calls.count(False) >= (3 * layers + 1) * steps


def check_batched_decoding_through_the_rows_kernel(device: str):
    """The batched decoder, compiled, with every linear of its steps of several rows in the rows kernel: requests
    decoded together get the greedy tokens each gets alone through the one-stream decoder (fp32, large random
    weights), and the rows kernel really ran, on as many rows as decoded together; with rows_kernel=False it
    does not run."""
    import torch

    from starsql.serve.fast import gemv
    from starsql.serve.fast.batched import BatchedDecoder
    from starsql.serve.fast.decoder import GreedyDecoder

    model, ids = chaotic_tiny_model(device, PROMPTS)
    expected = [list(GreedyDecoder(model, max_length=256, compile=False).tokens(i, 12)) for i in ids]
    gemv.use_gemv(model)
    rows_seen = []
    kernel = gemv.rows_kernel.run
    gemv.rows_kernel.run = lambda *a, **k: (rows_seen.append(a[4]), kernel(*a, **k))[1]
    try:
        for rows_kernel in (True, False):
            rows_seen.clear()
            decoder = BatchedDecoder(model, max_batch=4, max_length=256, compile=True, rows_kernel=rows_kernel)
            decoder.warm_up()
            requests = [decoder.submit(i, 12, None) for i in ids]
            while decoder.run_once():
                pass
            got = []
            for request in requests:
                tokens = []
                while (token := request.out.get()) is not None:
                    tokens.append(token)
                got.append(tokens)
            assert got == expected and len({tuple(t) for t in expected}) > 1, (rows_kernel, got, expected)
            if rows_kernel:  # the step of 3 live rows runs the 4-row bucket
                assert rows_seen and set(rows_seen) <= {2, 4} and 4 in rows_seen, rows_seen
            else:
                assert rows_seen == []
    finally:
        gemv.rows_kernel.run = kernel


if __name__ == "__main__":  # the subprocess: Triton's interpreter on a CPU
    sys.path.insert(0, str(ROOT))
    from starsql.serve.fast import gemv as _gemv

    _gemv.DEVICES = ("cuda", "cpu")
    check_kernel("cpu")
    check_rows_kernel("cpu")
    _gemv.BLOCK = dict(BLOCK_N=64, BLOCK_K=128)  # the interpreter runs programs one by one: fewer, wider ones
    _gemv.ROWS_BLOCK = dict(_gemv.ROWS_BLOCK, BLOCK_N=64)
    check_decoding_through_the_kernel("cpu")
    check_batched_decoding_through_the_rows_kernel("cpu")
    print("interpreted checks passed")


def test_the_kernel_computes_linear_and_decodes_identically_under_the_interpreter(tiny_model_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}  # one thread: the other test file has the other core
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "interpreted checks passed" in done.stdout


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the compiled kernel needs a GPU")
def test_the_kernel_computes_linear_and_decodes_identically_on_a_gpu(tiny_model_path):
    check_kernel("cuda")
    check_rows_kernel("cuda")
    check_decoding_through_the_kernel("cuda")
    check_batched_decoding_through_the_rows_kernel("cuda")


def test_use_gemv_routes_plain_linears_and_turns_them_back(tiny_model_path):
    import torch
    from transformers.models.starcoder2 import modeling_starcoder2 as starcoder2

    from starsql.serve.fast.gemv import GemvGeluMLP, GemvLinear, use_gemv
    from starsql.serve.load import load_for_inference

    model, tokenizer = load_for_inference("tiny-starcoder2")  # the loader leaves it plain
    assert not any(type(m) in (GemvLinear, GemvGeluMLP) for m in model.modules())
    ids = tokenizer("SELECT name FROM singer", return_tensors="pt")["input_ids"][:, :1]
    with torch.inference_mode():
        before = model(ids).logits
        linears = sum(type(m) is torch.nn.Linear for m in model.modules())
        assert use_gemv(model) == linears
        assert all(type(mlp) is GemvGeluMLP for mlp in (layer.mlp for layer in model.model.layers))
        # Not a GPU: one row still goes through F.linear, unchanged.
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
        assert use_gemv(model, enabled=False) == linears
    assert not any(type(m) in (GemvLinear, GemvGeluMLP) for m in model.modules())
    assert all(type(layer.mlp) is starcoder2.Starcoder2MLP for layer in model.model.layers)
