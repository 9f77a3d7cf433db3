"""Matrix-vector products for decoding: a Triton kernel for the linear layers of a one-token step.

Decoding one token reads every weight once, so a token takes as long as the GPU needs to stream the
weights. cuBLAS's kernels for these matrix-vector products stay below the memory bandwidth and split K for
wide layers (a second, reducing kernel each). This kernel streams each weight row once, accumulates in
fp32, adds the bias and rounds once, as cuBLAS does.

Its block shape is fixed, not autotuned: a tuner picks by timing, so a restart could pick another shape, sum
in another order and turn a near tie into another greedy token. Within a run it is faster only inside a
CUDA graph: called eagerly, the custom op costs more host time per call than F.linear.

`use_gemv(model)` turns the plain nn.Linear layers of an inference model into GemvLinear; they compute one
row with the kernel inside `routing()` (the fast decoder's step and prefill) and everything
else with F.linear. Without Triton (CPU installs) nothing changes.
"""

import contextlib

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

    def launch(x, weight, bias, out, gelu: bool):
        """The kernel over `weight`'s rows, on `x`'s device (Triton launches on the current one)."""
        N, K = weight.shape
        config = {**BLOCK, **LAUNCH}
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            gemv_kernel[(triton.cdiv(N, config["BLOCK_N"]),)](
                weight, x, bias, out, N, K, HAS_BIAS=bias is not None, GELU=gelu, **config)
        return out

    @torch.library.custom_op("starsql::gemv", mutates_args=())
    def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
        """F.linear(x, weight, bias), then GELU (tanh) if `gelu`, for an `x` of one row (leading dims of size 1)."""
        out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
        return launch(x.contiguous(), weight, bias, out, gelu)

    @gemv.register_fake
    def _(x, weight, bias, gelu):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


DEVICES = ("cuda",)  # where the kernel runs (tests add "cpu" under Triton's interpreter, TRITON_INTERPRET=1)
_routing = False  # set by routing(): the one-token linears of a decoding step use the kernel


@contextlib.contextmanager
def routing():
    """One-row inputs of GemvLinear / GemvGeluMLP layers go to the kernel while this is on. For code that runs
    compiled and captured in a CUDA graph; torch.compile traces with it on and guards on it."""
    global _routing
    previous, _routing = _routing, True
    try:
        yield
    finally:
        _routing = previous


def one_row(x: torch.Tensor, layer: nn.Linear) -> bool:
    """Inside routing(): `x` is one row on a kernel device, for inference (no gradients, no autocast, which
    would cast F.linear's inputs), in `layer`'s weight dtype, and the weight's offsets fit the kernel's int32."""
    return (_routing and x.device.type in DEVICES and x.shape[:-1].numel() == 1 and x.dtype == layer.weight.dtype
            and layer.weight.is_contiguous() and layer.weight.numel() < 2**31 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type))  # fmt: skip


class GemvLinear(nn.Linear):
    """nn.Linear that computes one row with `gemv` inside routing(), anything else with F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if one_row(x, self):
            return torch.ops.starsql.gemv(x, self.weight, self.bias, False)
        return super().forward(x)


class GemvGeluMLP(starcoder2.Starcoder2MLP):
    """StarCoder2's MLP with the GELU in c_fc's kernel for one row: one kernel fewer per layer and token
    (c_fc's own forward and its hooks are then skipped)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if type(self.c_fc) is not GemvLinear or not one_row(hidden_states, self.c_fc):  # a LoRA layer keeps its forward
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
