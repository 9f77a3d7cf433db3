"""Training: a LoRA layer's adapter branch as one autograd function, PEFT's arithmetic in fewer kernels.

PEFT's LoRA forward over a 4-bit base clones the base output, then runs dropout, A, B, a scaling and
an add, each a kernel over a full activation; autograd scales the gradient again in the backward.
`LoraBranch` computes the same `base + scaling * B(A(dropout(x)))`:
- no clone (the add writes a new tensor anyway);
- the scaling goes into the add (`torch.add(..., alpha=)`) forward, and onto the rank-r tensors
  (a and B, 16 columns) backward, instead of over the (tokens x features) activation and gradient.
With a power-of-two scaling (the recipe's lora_alpha 32 / r 16 = 2) every value is bitwise PEFT's:
multiplying by 2 is exact, so folding it elsewhere changes no rounding. Other scalings differ by at
most one rounding of the scaled branch. Dropout draws the same masks (the same kernel, in the same
order).

`fuse_lora(model)` switches a PEFT model's LoRA linear layers (4-bit and plain, each with PEFT's own
dtype casts) to it. A call the function does not cover (adapters off or merged, several adapters,
DoRA and other variants, LoRA biases, extra arguments such as per-call adapter names) runs PEFT's
own forward.
"""

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn


# Where F.dropout runs the fused kernel (at::dropout's is_fused_kernel_acceptable), whose backward is
# native_dropout_backward; on a CPU it multiplies by a noise tensor instead.
FUSED_DROPOUT_DEVICES = ("cuda", "xpu", "lazy", "privateuseone")


class LoraBranch(torch.autograd.Function):
    """base + scaling * B(A(dropout(x))), each matmul laid out as autograd lays out F.linear's (weight
    gradients as grad.t() @ input: the same GEMM, contiguous, no copy when they accumulate)."""

    @staticmethod
    def forward(ctx, x, base, weight_a, weight_b, scaling: float, dropout_p: float, round_branch: bool):
        """round_branch: the branch's output is cast to the base output's dtype before the add (PEFT's 4-bit
        layer outside autocast); otherwise the sum is, after adding in the wider dtype (PEFT's Linear)."""
        # The backward's matmuls run under the forward's autocast (what torch.amp.custom_bwd does, for any device).
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        if dropout_p > 0:  # nn.Dropout's random draws and values (F.dropout's, on CUDA and on CPU)
            dropped, mask = torch.native_dropout(x, dropout_p, True)
        else:
            dropped, mask = x, None
        a = F.linear(dropped, weight_a)
        b = F.linear(a, weight_b)
        if round_branch:
            out = torch.add(base, b.to(base.dtype), alpha=scaling)
        else:
            out = torch.add(base, b, alpha=scaling).to(base.dtype)
        ctx.save_for_backward(dropped, a, weight_a, weight_b, mask)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad):
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return LoraBranch._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        dropped, a, weight_a, weight_b, mask = ctx.saved_tensors
        scaling = ctx.scaling
        grad_2d = grad.reshape(-1, grad.shape[-1]).to(a.dtype)  # PEFT's cast of the branch's output, backward
        a_2d = a.reshape(-1, a.shape[-1])
        # PEFT: grad_b = scaling * grad over the whole activation; here the factor rides on a and B.
        grad_a = grad_2d.mm(weight_b * scaling)
        grad_weight_b = grad_2d.t().mm(a_2d * scaling) if ctx.needs_input_grad[3] else None
        grad_weight_a = grad_a.t().mm(dropped.reshape(-1, dropped.shape[-1])) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_a.mm(weight_a).reshape(dropped.shape).to(dropped.dtype)  # autocast's cast back, then dropout's
            if mask is not None and grad_x.device.type in FUSED_DROPOUT_DEVICES:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - ctx.dropout_p))
            elif mask is not None:  # F.dropout elsewhere multiplies by a noise tensor of x's dtype: mask / (1 - p)
                grad_x = grad_x * mask.to(grad_x.dtype).div_(1.0 - ctx.dropout_p)
        return grad_x, grad, grad_weight_a, grad_weight_b, None, None, None


def _dropout_p(layer: LoraLayer, adapter: str) -> float:
    """The probability PEFT's dropout of x uses in this call (nn.Identity or eval mode: none)."""
    dropout = layer.lora_dropout[adapter]
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _fusable(layer: LoraLayer, has_arguments: bool) -> str | None:
    """The one active adapter LoraBranch can compute, or None (PEFT's forward takes the call)."""
    # Extra arguments (per-call adapter names, variant keywords) are PEFT's to interpret.
    if has_arguments or layer.disable_adapters or layer.merged:
        return None
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(adapters) != 1 or adapters[0] in getattr(layer, "lora_variant", {}):
        return None
    adapter = adapters[0]
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if lora_a.bias is not None or lora_b.bias is not None or not isinstance(lora_a, nn.Linear):
        return None
    if _dropout_p(layer, adapter) >= 1:  # all dropped: PEFT's base output
        return None
    return adapter


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = _fusable(self, bool(args or kwargs))
    if adapter is None:
        return self._peft_forward(x, *args, **kwargs)
    self._check_forward_args(x)
    base = self.base_layer(x)
    # PEFT's dtype handling: its 4-bit layer casts x to the adapter's dtype and the branch's output to the base
    # output's, except under autocast (it asks torch.is_autocast_enabled(): CUDA's); its Linear always casts x,
    # adds in the wider dtype and casts the sum.
    cast = not (self._round_branch and torch.is_autocast_enabled("cuda"))
    lora_x = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype) if cast else x
    return LoraBranch.apply(lora_x, base, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                            self.scaling[adapter], _dropout_p(self, adapter), self._round_branch and cast)  # fmt: skip


# Named module-level classes, so a model with fused layers pickles (torch.save(model)) like PEFT's own.
class FusedLinear(LoraLinear):
    forward, _peft_forward, _fused_lora, _round_branch = fused_forward, LoraLinear.forward, True, False


FUSED_CLASSES = {LoraLinear: FusedLinear}  # PEFT's class: its fused subclass
try:
    from peft.tuners.lora.bnb import Linear4bit

    class FusedLinear4bit(Linear4bit):
        # PEFT's 4-bit layer rounds the branch's output to the base output's dtype before adding it.
        forward, _peft_forward, _fused_lora, _round_branch = fused_forward, Linear4bit.forward, True, True

    FUSED_CLASSES[Linear4bit] = FusedLinear4bit
except ImportError:  # PEFT without bitsandbytes defines no 4-bit layer
    pass


def fuse_lora(model: nn.Module, enabled: bool = True) -> int:
    """Switch the model's LoRA linear layers to LoraBranch (enabled) or back to PEFT's forward; returns
    how many layers now run fused. Swaps classes only: weights, state dicts and saving are untouched."""
    fused = 0
    for module in model.modules():
        cls = type(module)
        if getattr(cls, "_fused_lora", False):
            if not enabled:
                module.__class__ = cls.__bases__[0]
            fused += enabled
        elif enabled and cls in FUSED_CLASSES:
            module.__class__ = FUSED_CLASSES[cls]
            fused += 1
    return fused
