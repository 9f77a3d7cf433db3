"""Matrix products for decoding: Triton kernels for the linear layers of a decoding step (one row, or a few).

Decoding one token reads every weight once, so a token takes as long as the GPU needs to stream the
weights. cuBLAS's kernels for these matrix-vector products stay below the memory bandwidth and split K for
wide layers (a second, reducing kernel each). `gemv_kernel` streams each weight row once, accumulates in
fp32, adds the bias and rounds once, as cuBLAS does. A batched step of 2 to 16 rows (the batched decoder's)
is as bound by the weights' bytes; `rows_kernel` streams each weight tile once for all its rows, on tensor cores,
without a split K.

Their block shapes are fixed, not autotuned: a tuner picks by timing, so a restart could pick another shape, sum
in another order and turn a near tie into another greedy token. Within a run they are faster only inside a
CUDA graph: called eagerly, the custom op costs more host time per call than F.linear.

`use_gemv(model)` turns the plain nn.Linear layers of an inference model into GemvLinear; inside `routing()` (the
fast decoders' steps and prefills) they compute one row with the kernel, a few rows with the rows kernel where
routing(rows=...) allows them (the batched decoder's steps, DECODE_ROWS_KERNEL) and everything else with F.linear.
Without Triton (CPU installs) nothing changes.
"""

import contextlib
import os

import torch
from torch import nn
from transformers.models.starcoder2 import modeling_starcoder2 as starcoder2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every linear layer keeps F.linear
    triton = None

# Two weight rows per program, 1,024 columns a loop step: the fastest of the shapes bench/generate_speed.py's
# sweep times for StarCoder2-3B's o_proj, c_fc and c_proj, and close to it for the head.
BLOCK = dict(BLOCK_N=2, BLOCK_K=1024)
LAUNCH = dict(num_warps=4, num_stages=3)
# The rows kernel: 16 rows a block (fewer are masked), 32 weight rows a program, 256 columns a loop step, 5 stages in
# flight: one shape for every layer, tied fastest in bench/rows_kernel_sweep.py's sweep over StarCoder2-3B's linears at
# 16 rows (and among the fastest at 4). fp32 (the identity checks) holds fewer stages in shared memory.
ROWS = 16
ROWS_BLOCK = dict(BLOCK_M=ROWS, BLOCK_N=32, BLOCK_K=256)
ROWS_LAUNCH = dict(num_warps=4, num_stages=5)
ROWS_LAUNCH_FP32 = dict(num_warps=4, num_stages=2)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by Triton at its import, as here: fixed for the process

if triton is not None:

    @triton.jit
    def gemv_kernel(weight, x, bias, out, N, K, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[n] = sum_k weight[n, k] * x[k] (+ bias[n]) for BLOCK_N rows n; weight row-major (N, K).
        GELU: then the tanh-approximated GELU, of the value rounded to out's dtype as an unfused GELU sees it."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            w = tl.load(weight + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0)
            v = tl.load(x + cols, mask=cols < K, other=0.0)
            acc += w.to(tl.float32) * v.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias + rows, mask=rows < N, other=0.0).to(tl.float32)
        if GELU:  # 0.5 y (1 + tanh(u)) = y sigmoid(2u), u = sqrt(2/pi) (y + 0.044715 y^3)
            y = y.to(out.dtype.element_ty).to(tl.float32)
            y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
        tl.store(out + rows, y.to(out.dtype.element_ty), mask=rows < N)

    @triton.jit
    def rows_kernel(weight, x, bias, out, M, N, K, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n]) for the M rows of x (M <= BLOCK_M; x and out
        row-major) and BLOCK_N columns n, through tl.dot (tensor cores), accumulated in fp32. UPCAST: the products
        in fp32, exactly (fp32 weights; and Triton's interpreter, whose dot misreads bf16). GELU as in gemv_kernel."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            w = tl.load(weight + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
            v = tl.load(x + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
            if UPCAST:
                acc = tl.dot(v.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(v, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = acc.to(out.dtype.element_ty).to(tl.float32)
            acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
        tl.store(out + rows[:, None] * N + cols[None, :], acc.to(out.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

    def launch(x, weight, bias, out, gelu: bool, config: dict | None = None):
        """The kernel over `weight`'s rows, on `x`'s device (Triton launches on the current one): `gemv_kernel` for
        one row of x, `rows_kernel` for up to ROWS (x and out contiguous). `config`: block shape and launch settings
        in place of the shipped ones (the benchmarks' sweeps)."""
        N, K = weight.shape
        M = x.numel() // K
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            if M == 1:
                config = {**BLOCK, **LAUNCH, **(config or {})}
                gemv_kernel[(triton.cdiv(N, config["BLOCK_N"]),)](
                    weight, x, bias, out, N, K, HAS_BIAS=bias is not None, GELU=gelu, **config)
            elif M <= ROWS:
                upcast = x.dtype == torch.float32 or INTERPRETED
                config = {**ROWS_BLOCK, **(ROWS_LAUNCH_FP32 if x.dtype == torch.float32 else ROWS_LAUNCH), **(config or {})}
                rows_kernel[(triton.cdiv(N, config["BLOCK_N"]),)](
                    weight, x, bias, out, M, N, K, HAS_BIAS=bias is not None, GELU=gelu, UPCAST=upcast, **config)
            else:
                raise ValueError(f"the decoding kernels take at most {ROWS} rows, not {M}")
        return out

    @torch.library.custom_op("starsql::gemv", mutates_args=())
    def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
        """F.linear(x, weight, bias), then GELU (tanh) if `gelu`, for an `x` of one row to ROWS rows (its leading
        dims hold that many)."""
        out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
        return launch(x.contiguous(), weight, bias, out, gelu)

    @gemv.register_fake
    def _(x, weight, bias, gelu):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


DEVICES = ("cuda",)  # where the kernel runs (tests add "cpu" under Triton's interpreter, TRITON_INTERPRET=1)
_routed_rows = 0  # set by routing(): inputs of at most this many rows use the kernels (0: none)


@contextlib.contextmanager
def routing(rows: int = 1):
    """Inputs of GemvLinear / GemvGeluMLP layers of at most `rows` rows (1, or up to ROWS) go to the kernels while
    this is on. For code that runs compiled and captured in a CUDA graph; torch.compile traces with it on and
    guards on it."""
    global _routed_rows
    if not 1 <= rows <= ROWS:
        raise ValueError(f"the decoding kernels take 1 to {ROWS} rows, not {rows}")
    previous, _routed_rows = _routed_rows, rows
    try:
        yield
    finally:
        _routed_rows = previous


def routed(x: torch.Tensor, layer: nn.Linear) -> bool:
    """Inside routing(): `x` has at most its rows, on a kernel device, for inference (no gradients, no autocast,
    which would cast F.linear's inputs), in `layer`'s weight dtype, and the weight's offsets fit the kernels' int32."""
    return (_routed_rows > 0 and x.shape[:-1].numel() <= _routed_rows and x.device.type in DEVICES
            and x.dtype == layer.weight.dtype and layer.weight.is_contiguous() and layer.weight.numel() < 2**31
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type))  # fmt: skip


class GemvLinear(nn.Linear):
    """nn.Linear that computes the rows routing() allows with `gemv`, anything else with F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if routed(x, self):
            return torch.ops.starsql.gemv(x, self.weight, self.bias, False)
        return super().forward(x)


class GemvGeluMLP(starcoder2.Starcoder2MLP):
    """StarCoder2's MLP with the GELU in c_fc's kernel for the rows routing() allows: one kernel fewer per layer and
    token (c_fc's own forward and its hooks are then skipped)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if type(self.c_fc) is not GemvLinear or not routed(hidden_states, self.c_fc):  # a LoRA layer keeps its forward
            return super().forward(hidden_states)
        hidden_states = torch.ops.starsql.gemv(hidden_states, self.c_fc.weight, self.c_fc.bias, True)
        hidden_states = self.c_proj(hidden_states)
        return nn.functional.dropout(hidden_states, p=self.residual_dropout, training=self.training)


def gemv_available(model) -> bool:
    """Triton is installed and the model is on a GPU."""
    return triton is not None and next(model.parameters()).is_cuda


def use_gemv(model, enabled: bool = True) -> int:
    """Turn `model`'s plain nn.Linear layers into GemvLinear (a LoRA layer's base layer too; 4-bit layers are
    not nn.Linear), and StarCoder2 MLPs with the tanh GELU into GemvGeluMLP, in place; enabled=False turns
    them back. Returns how many linear layers changed."""
    swaps = [(nn.Linear, GemvLinear)]
    if getattr(model.config, "hidden_act", None) == "gelu_pytorch_tanh":
        swaps.append((starcoder2.Starcoder2MLP, GemvGeluMLP))
    changed = 0
    for plain, routed in swaps:
        old, new = (plain, routed) if enabled else (routed, plain)
        modules = [module for module in model.modules() if type(module) is old]
        for module in modules:
            module.__class__ = new
        changed += len(modules) if plain is nn.Linear else 0
    return changed
