"""Matrix-vector products for decoding: a Triton kernel for linear layers fed one token.

Decoding one token of a 3B model reads every weight once, so a token takes as long as the GPU needs to
stream 6 GB. cuBLAS's kernels for these matrix-vector products reached 2.0-2.8 TB/s of an H100's 3.35,
and split K for the layers with 3,072 outputs (a second, reducing kernel each). This kernel streams each
weight row once, accumulates in fp32, adds the bias and rounds once, as cuBLAS does; its block sizes are
tuned per weight shape on first use (BENCHMARKS.md has the numbers).

`use_gemv(model)` routes every plain nn.Linear of an inference model through it when the input is one row
on a GPU; other inputs (prompts, batches, training) keep F.linear. Without Triton (CPU installs) nothing
changes.
"""

import os

import torch
from torch import nn
from transformers.models.starcoder2 import modeling_starcoder2 as starcoder2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every linear layer keeps F.linear
    triton = None

# Block shapes tried per weight shape: rows per program x columns per loop step, warps, pipeline stages.
# Few rows per program for the layers with 3,072 outputs (enough programs to fill 132 SMs), more for wide ones.
CONFIGS = [
    dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    for block_n, block_k, warps, stages in [
        (1, 1024, 4, 3), (2, 512, 4, 3), (2, 1024, 4, 3), (4, 256, 4, 4), (4, 512, 4, 3), (4, 1024, 4, 2),
        (4, 1024, 8, 3), (8, 256, 4, 4), (8, 512, 4, 3), (8, 512, 8, 3), (16, 256, 4, 3), (16, 256, 8, 4),
        (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (64, 128, 8, 3),
    ]
]

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

    # Triton's interpreter (TRITON_INTERPRET=1: tests on a CPU) cannot time configs: it runs the widest.
    INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
    tuned_gemv_kernel = triton.autotune(
        [triton.Config({"BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
         for c in (CONFIGS[-1:] if INTERPRETED else CONFIGS)],
        key=["N", "K"],
    )(gemv_kernel)  # fmt: skip

    @torch.library.custom_op("starsql::gemv", mutates_args=())
    def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
        """F.linear(x, weight, bias), then GELU (tanh) if `gelu`, for an `x` of one row (leading dims of size 1)."""
        N, K = weight.shape
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        tuned_gemv_kernel[grid](weight, x.contiguous(), bias, out, N, K, HAS_BIAS=bias is not None, GELU=gelu)
        return out

    @gemv.register_fake
    def _(x, weight, bias, gelu):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


DEVICES = ("cuda",)  # where the kernel runs (tests add "cpu" under Triton's interpreter)


def one_row(x: torch.Tensor, layer: nn.Linear) -> bool:
    """`x` is one row on a GPU, for inference (no gradients), in the dtype of `layer`'s weight."""
    return (x.device.type in DEVICES and x.shape[:-1].numel() == 1 and x.dtype == layer.weight.dtype and layer.weight.is_contiguous()
            and not torch.is_grad_enabled())  # fmt: skip


class GemvLinear(nn.Linear):
    """nn.Linear that computes one row on a GPU with `gemv` (decoding one token), anything else with F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if one_row(x, self):
            return torch.ops.starsql.gemv(x, self.weight, self.bias, False)
        return super().forward(x)


class GemvGeluMLP(starcoder2.Starcoder2MLP):
    """StarCoder2's MLP with the GELU in c_fc's kernel for one row: one kernel fewer per layer and token."""

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
    """Route `model`'s plain nn.Linear layers through GemvLinear (a LoRA layer's base layer too; 4-bit layers
    are not nn.Linear), and StarCoder2 MLPs with the tanh GELU through GemvGeluMLP, in place; enabled=False
    turns them back. Returns how many linear layers changed."""
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
