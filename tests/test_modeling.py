"""Model loading: the dtype a frozen base is loaded in, and LayerNorm's output dtype under autocast."""

import pytest
import torch

import starsql.train.model as modeling
from starsql.train.model import HalfPrecisionLayerNorm, ModelArguments, load_model


@pytest.fixture
def gpu_dtype(monkeypatch, tiny_model_path):
    """What compute_dtype() returns on a bf16 GPU (this machine has none)."""
    monkeypatch.setattr(modeling, "compute_dtype", lambda: torch.bfloat16)


def test_a_4bit_base_loads_in_the_compute_dtype_not_trls_float32(gpu_dtype):
    # TRL's ModelConfig defaults to float32: embeddings, norms, biases and the 4-bit compute dtype
    # were fp32, and so was every activation outside autocast's matmuls.
    args = ModelArguments(model_name_or_path="tiny-starcoder2")
    model = load_model(args)
    assert args.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16  # bitsandbytes Linear4bit


def test_full_fine_tuning_keeps_fp32_master_weights_and_an_explicit_dtype_wins(gpu_dtype):
    full = load_model(ModelArguments(model_name_or_path="tiny-starcoder2", use_peft=False, load_in_4bit=False))
    assert full.get_input_embeddings().weight.dtype == torch.float32
    explicit = load_model(ModelArguments(model_name_or_path="tiny-starcoder2", dtype="float32"))
    assert explicit.get_input_embeddings().weight.dtype == torch.float32


def test_fp16_gpus_keep_fp32_weights(monkeypatch, tiny_model_path):
    # T4/V100: StarCoder2's activations are bf16-sized; an fp16 residual stream could overflow.
    monkeypatch.setattr(modeling, "compute_dtype", lambda: torch.float16)
    model = load_model(ModelArguments(model_name_or_path="tiny-starcoder2"))
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_layer_norms_run_outside_autocast_on_their_input_dtype(monkeypatch, tiny_model_path):
    # CPU autocast keeps layer_norm in bf16 anyway; CUDA autocast runs it in fp32 and returns fp32.
    # So check what reaches the kernel: autocast off, weights in the input's dtype.
    model = load_model(ModelArguments(model_name_or_path="tiny-starcoder2", load_in_4bit=False))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(type(m) is HalfPrecisionLayerNorm for m in norms)
    norm = norms[0]
    calls, layer_norm = [], torch.nn.functional.layer_norm

    def spy(x, shape, weight=None, bias=None, eps=1e-5):
        calls.append((torch.is_autocast_enabled("cpu"), x.dtype, weight.dtype, bias.dtype))
        return layer_norm(x, shape, weight, bias, eps)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", spy)
    x = torch.randn(4, norm.normalized_shape[0], dtype=torch.bfloat16) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert calls == [(False, torch.bfloat16, torch.bfloat16, torch.bfloat16)]
    assert out.dtype == torch.bfloat16
    reference = layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    assert torch.allclose(out.float(), reference, atol=2e-2, rtol=1e-2)


def test_half_precision_layer_norm_can_be_turned_off(tiny_model_path):
    model = load_model(ModelArguments(model_name_or_path="tiny-starcoder2", half_precision_layer_norm=False))
    assert not any(type(m) is HalfPrecisionLayerNorm for m in model.modules())
