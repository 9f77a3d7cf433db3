"""Model and tokenizer loading: 4-bit NF4 (QLoRA), plain bf16 LoRA, or full fine-tuning.

The arguments are TRL's `ModelConfig` with this project's defaults: StarCoder2-3B in 4-bit NF4
with double quantization, LoRA on all six linear projections of StarCoder2.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from trl import ModelConfig, get_peft_config, get_quantization_config

from ..tiny import TINY_MODEL, resolve_model_path

# Every linear layer of a StarCoder2 block. (Upstream starcoder2 finetune.py names
# gate_proj/up_proj/down_proj, which StarCoder2 does not have, so only attention got adapted.)
STARCODER2_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]


@dataclass
class ModelArguments(ModelConfig):
    model_name_or_path: str | None = field(
        default="bigcode/starcoder2-3b",
        metadata={"help": f"Hub id or local folder of any causal LM; `{TINY_MODEL}` builds a tiny one offline."},
    )
    use_peft: bool = field(default=True, metadata={"help": "LoRA adapter (true) or full fine-tuning (false)."})
    load_in_4bit: bool = field(default=True, metadata={"help": "Load the base in 4-bit NF4 (QLoRA)."})
    use_bnb_nested_quant: bool = field(default=True, metadata={"help": "Double quantization of the 4-bit scales."})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: list(STARCODER2_LINEAR), metadata={"help": "Module names LoRA adapts."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights outside the 4-bit layers, and the 4-bit compute dtype. Default (or auto): bfloat16 for "
            "a frozen base on GPUs that have it; float32 otherwise (full fine-tuning, fp16 GPUs, CPU).",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    half_precision_layer_norm: bool = field(
        default=True,
        metadata={
            "help": "Under bf16/fp16 mixed precision, LayerNorm returns bf16/fp16 (it still computes in fp32 "
            "inside) instead of autocast's fp32, so the residual stream, dropouts and attention stay in half precision."
        },
    )


def compute_dtype() -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_dtype(model_args: ModelArguments) -> torch.dtype:
    """The dtype the model is loaded in. TRL's ModelConfig defaults to float32, which would leave the
    embeddings, norms, biases and the 4-bit compute dtype of a frozen base in fp32 on bf16 GPUs too,
    and with them every activation outside autocast's matmuls: twice the memory traffic of bf16, while
    the matmuls see bf16 inputs either way."""
    if isinstance(model_args.dtype, torch.dtype):  # load_model sets it: the same arguments load twice
        return model_args.dtype
    if model_args.dtype not in (None, "auto"):
        return getattr(torch, model_args.dtype)
    # A frozen base computes in bf16. Fully fine-tuned weights stay fp32 (autocast does the rest), and so
    # do a base's on fp16 GPUs (T4, V100): StarCoder2's activations are bf16-sized, fp16 could overflow.
    dtype = compute_dtype()
    return dtype if model_args.use_peft and dtype == torch.bfloat16 else torch.float32


def attention_implementation(requested: str | None) -> str:
    """flash_attention_2 when installed on a GPU, else SDPA; all keep packed examples apart.

    Packed, padding-free batches are one long row with a block-diagonal mask: SDPA computes every
    block of it, while `flex_attention` skips the blocks between examples, the same loss in less work
    at large micro-batches (configs/starcoder2-3b-sql-fast.yaml sets it). It is not the automatic
    choice: its first step compiles its kernels, and at the recipe's micro-batch of 1-4 rows there is
    little between packed examples to skip."""
    if requested:
        return requested
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"


class HalfPrecisionLayerNorm(nn.LayerNorm):
    """A LayerNorm that returns its input's dtype under autocast.

    Autocast runs layer_norm in fp32 and returns fp32. In StarCoder2 that output feeds the 4-bit
    projections, which return their input's dtype, so q/k/v, the MLP, PEFT's dropouts and, from the
    first MLP on, the residual stream would run in fp32 even with bf16 weights. The kernel
    accumulates in fp32 on bf16 input anyway, and every linear layer casts its input to bf16 under
    autocast, so the matmuls see the same values while the rest moves half the bytes."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(hidden_states.device.type, enabled=False):
            return nn.functional.layer_norm(hidden_states, self.normalized_shape, weight, bias, self.eps)


def use_half_precision_layer_norms(model) -> int:
    """Turn every plain nn.LayerNorm of `model` into a HalfPrecisionLayerNorm (same weights); returns how many."""
    norms = [module for module in model.modules() if type(module) is nn.LayerNorm]
    for module in norms:
        module.__class__ = HalfPrecisionLayerNorm
    return len(norms)


def load_tokenizer(model_args: ModelArguments):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(model_args.model_name_or_path), revision=model_args.model_revision
    )
    if tokenizer.eos_token is None:
        raise ValueError(f"{model_args.model_name_or_path}'s tokenizer has no EOS token; generation could not stop.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args: ModelArguments):
    """The base model, quantized if asked; the LoRA adapter is added by the trainer (peft_config)."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise ValueError("Choose one of load_in_4bit and load_in_8bit.")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        raise ValueError("A quantized base cannot be fully fine-tuned: set use_peft true, or load_in_4bit false.")
    dtype = load_dtype(model_args)
    model_args.dtype = dtype  # get_quantization_config uses it as the 4-bit compute dtype
    quantization = get_quantization_config(model_args)
    attention = attention_implementation(model_args.attn_implementation)
    # flex_attention has no attention dropout; StarCoder2-3B's config sets 0.1 (LoRA dropout stays).
    overrides = {"attention_dropout": 0.0} if attention == "flex_attention" else {}
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_args.model_name_or_path),
        revision=model_args.model_revision,
        dtype=dtype,
        quantization_config=quantization,
        attn_implementation=attention,
        # One whole 4-bit copy per process, on that process's GPU (`accelerate launch`: DDP).
        device_map={"": PartialState().local_process_index} if quantization and torch.cuda.is_available() else None,
        **overrides,
    )
    if quantization is not None and not torch.cuda.is_available():
        # On CPU, bitsandbytes repacks 4-bit weights for inference at the first eval forward, and
        # the training forward after it fails (in-place bias add on a grad view): keep one layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if model_args.half_precision_layer_norm:
        use_half_precision_layer_norms(model)
    return model


def lora_config(model_args: ModelArguments):
    return get_peft_config(model_args)
