"""Load a base model and its adapter for inference: what the app serves and evaluation scores."""

import torch

from ..tiny import resolve_model_path


def inference_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(base_model: str, adapter: str | None = None, load_in_4bit: bool = False, device: str | None = None):
    """(model, tokenizer) ready for `generate()`, in eval mode. The adapter is merged into the base's weights
    (bf16 on a GPU, fp32 on a CPU), so inference runs one matmul per layer; on a 4-bit base it stays a separate
    LoRA layer, as it was trained."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or inference_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base_path = resolve_model_path(base_model)
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
        if load_in_4bit
        else None
    )
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, quantization_config=quantization)
    if quantization is None:
        model = model.to(device)
    tokenizer = load_tokenizer(base_model, adapter)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if not load_in_4bit:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def load_tokenizer(base_model: str, adapter: str | None = None):
    """The tokenizer the adapter was trained with (saved beside it), else the base's; padding with EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter or resolve_model_path(base_model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
