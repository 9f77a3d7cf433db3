"""starsql.train.fused_lora: PEFT's LoRA arithmetic in one autograd function, bitwise for power-of-two scalings."""

import json

import pytest
import torch

from conftest import ROOT

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]


def lora_model(path, dtype, quantized: bool, adapter_dtype=None, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = {}
    if quantized:
        extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_compute_dtype=dtype)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    # B random too (PEFT's init_lora_weights=False), so the adapter branch changes the output from the start.
    config = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, init_lora_weights=False) | lora
    model = get_peft_model(model, LoraConfig(**config)).train()
    for name, param in model.named_parameters():  # as TRL casts them for bf16 training
        if adapter_dtype is not None and "lora_" in name:
            param.data = param.data.to(adapter_dtype)
    return model


@pytest.fixture
def branch_calls(monkeypatch):
    """Calls of LoraBranch (the fused path), recorded while the test runs."""
    from starsql.train import fused_lora

    calls, real = [], fused_lora.LoraBranch.apply
    monkeypatch.setattr(fused_lora.LoraBranch, "apply", lambda *args: calls.append(1) or real(*args))
    return calls


def step(model, autocast_dtype=None):
    """Loss, logits and every gradient (LoRA weights and the embeddings' input) of one training forward."""
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (2, 48))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads | {"inputs_embeds": embeds.grad}


@pytest.mark.parametrize("quantized", [False, True], ids=["plain-base", "4bit-base"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)],
                         ids=["fp32", "bf16-fp32-adapters", "fp32-bf16-adapters"])  # fmt: skip
def test_power_of_two_scaling_is_bitwise_peft(tiny_model_path, dtype, adapter_dtype, quantized):
    # Each pair of dtypes takes other casts in PEFT's forward (get_peft_model keeps adapters in fp32).
    from starsql.train.fused_lora import fuse_lora

    reference = step(lora_model(tiny_model_path, dtype, quantized, adapter_dtype))
    model = lora_model(tiny_model_path, dtype, quantized, adapter_dtype)
    assert fuse_lora(model) == 12  # 6 projections x 2 layers
    fused = step(model)
    assert torch.equal(fused[0], reference[0]) and torch.equal(fused[1], reference[1])
    assert fused[2].keys() == reference[2].keys() and len(reference[2]) == 25  # 24 LoRA matrices + the input
    for name, grad in reference[2].items():
        assert torch.equal(fused[2][name], grad), name


def test_other_scalings_match_peft_to_a_rounding(tiny_model_path):
    from starsql.train.fused_lora import fuse_lora

    # alpha 24 / r 16 = 1.5: the scaling moves across a rounding.
    reference = step(lora_model(tiny_model_path, torch.float32, False, lora_alpha=24))
    model = lora_model(tiny_model_path, torch.float32, False, lora_alpha=24)
    fuse_lora(model)
    fused = step(model)
    assert torch.allclose(fused[0], reference[0], rtol=1e-5)
    for name, grad in reference[2].items():
        assert (fused[2][name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_autocast_with_fp32_adapters_is_bitwise_peft(tiny_model_path):
    from starsql.train.fused_lora import fuse_lora

    # fp32 weights under bf16 autocast (CPU's standing in): the function casts x to the adapter's dtype and
    # back as PEFT does outside CUDA's autocast (the attention's bf16 output into o_proj, bf16 matmuls).
    reference = step(lora_model(tiny_model_path, torch.float32, False), torch.bfloat16)
    model = lora_model(tiny_model_path, torch.float32, False)
    fuse_lora(model)
    fused = step(model, torch.bfloat16)
    assert torch.equal(fused[0], reference[0])
    for name, grad in reference[2].items():
        assert fused[2][name].dtype == grad.dtype and torch.equal(fused[2][name], grad), name


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32-adapters"])
def test_the_4bit_layer_under_cuda_autocast_is_bitwise_peft(tiny_model_path, dtype, adapter_dtype, monkeypatch):
    # The recipe's path: a 4-bit base under CUDA's autocast, where PEFT casts nothing. CPU's autocast stands in:
    # both PEFT (torch.is_autocast_enabled()) and the fused forward ("cuda") are told it is CUDA's.
    from starsql.train.fused_lora import fuse_lora

    real = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device=None: real("cpu" if device in (None, "cuda") else device))
    reference = step(lora_model(tiny_model_path, dtype, True, adapter_dtype), torch.bfloat16)
    model = lora_model(tiny_model_path, dtype, True, adapter_dtype)
    fuse_lora(model)
    fused = step(model, torch.bfloat16)
    assert torch.equal(fused[0], reference[0]) and torch.equal(fused[1], reference[1])
    for name, grad in reference[2].items():
        assert fused[2][name].dtype == grad.dtype and torch.equal(fused[2][name], grad), name


def test_calls_it_does_not_cover_run_peft(tiny_model_path, branch_calls):
    # Merged adapters, two active adapters, per-call adapter names, LoRA biases, everything dropped: PEFT's forward.
    from peft import LoraConfig

    from starsql.train import fused_lora

    def layer_outputs(model, **kwargs):
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        torch.manual_seed(2)
        return layer(torch.randn(3, 64), **kwargs)

    def merged(model):
        model.merge_adapter()

    def two_adapters(model):
        model.add_adapter("other", LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
        model.base_model.set_adapter(["default", "other"])

    cases = {"merged": (merged, {}, {}), "two adapters": (two_adapters, {}, {}),
             "adapter names": (lambda m: m.eval(), {}, {"adapter_names": ["default"] * 3}),
             "lora bias": (None, {"lora_bias": True}, {}), "all dropped": (None, {"lora_dropout": 1.0}, {})}  # fmt: skip
    for name, (prepare, lora, kwargs) in cases.items():
        model = lora_model(tiny_model_path, torch.float32, False, **lora)
        if prepare:
            prepare(model)
        expected = layer_outputs(model, **kwargs)
        assert fused_lora.fuse_lora(model) > 0
        assert torch.equal(layer_outputs(model, **kwargs), expected), name
    assert not branch_calls


def test_a_fused_model_pickles(tiny_model_path):
    import io

    from starsql.train.fused_lora import FusedLinear, fuse_lora

    model = lora_model(tiny_model_path, torch.float32, False)
    fuse_lora(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.base_model.model.model.layers[0].mlp.c_fc) is FusedLinear
    assert torch.equal(step(loaded)[0], step(model)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's kernels and autocast need a GPU")
@pytest.mark.parametrize("quantized", [False, True], ids=["bf16-base", "4bit-base"])
def test_gpu_layers_are_bitwise_peft(quantized):
    # Output, input gradient and both LoRA gradients, to the bit, at recipe-like widths (8,192 x 3,072 -> 12,288
    # and back), under CUDA's autocast (the recipe) and without, fp32 and bf16 adapters.
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from starsql.train.fused_lora import fuse_lora

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            make = (lambda i, o: bnb.nn.Linear4bit(i, o, compute_dtype=torch.bfloat16, quant_type="nf4")) if quantized \
                else (lambda i, o: torch.nn.Linear(i, o, dtype=torch.bfloat16))  # fmt: skip
            self.c_fc, self.c_proj = make(3072, 12288), make(12288, 3072)

        def forward(self, x):
            return self.c_proj(torch.nn.functional.gelu(self.c_fc(x)))

    def run(fused, autocast, adapter_dtype):
        torch.manual_seed(0)
        model = TwoLayers().cuda()
        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["c_fc", "c_proj"], init_lora_weights=False)
        model = get_peft_model(model, config).train()
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(adapter_dtype)
        if fused:
            assert fuse_lora(model) == 2
        x = torch.randn(8192, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().square().mean().backward()
        return [out, x.grad] + [p.grad for n, p in sorted(model.named_parameters()) if p.grad is not None]

    for autocast in (True, False):
        for adapter_dtype in (torch.bfloat16, torch.float32):
            reference, fused = run(False, autocast, adapter_dtype), run(True, autocast, adapter_dtype)
            assert len(fused) == len(reference) == 6
            for i, (a, b) in enumerate(zip(fused, reference)):
                assert a.dtype == b.dtype and torch.equal(a, b), (autocast, adapter_dtype, i)


def test_uncovered_calls_run_peft_and_unfusing_restores_the_classes(tiny_model_path, branch_calls):
    from peft.tuners.lora.bnb import Linear4bit

    from starsql.train import fused_lora

    model = lora_model(tiny_model_path, torch.float32, True)
    fused_lora.fuse_lora(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with model.disable_adapter():  # adapters off: the base layer alone, as PEFT does
        assert torch.equal(layer(x), layer.base_layer(x)) and not branch_calls
    model.eval()
    expected = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * 2.0
    assert torch.allclose(layer(x), expected, atol=1e-5) and len(branch_calls) == 1  # eval: no dropout, fused
    assert type(layer).__name__ == "FusedLinear4bit" and isinstance(layer, Linear4bit)
    assert fused_lora.fuse_lora(model, enabled=False) == 0 and type(layer) is Linear4bit
    assert not [m for m in model.modules() if getattr(type(m), "_fused_lora", False)]

    dora = lora_model(tiny_model_path, torch.float32, False, use_dora=True)  # a variant: PEFT's forward
    reference = step(lora_model(tiny_model_path, torch.float32, False, use_dora=True))
    fused_lora.fuse_lora(dora)
    assert torch.equal(step(dora)[0], reference[0])


def test_training_losses_are_bitwise_those_of_peft(tmp_path, tiny_model_path, branch_calls):
    # train_sft.py fuses by default (TrainingConfig.fused_lora) and --fused_lora false is PEFT's forward: the
    # tiny QLoRA recipe with LoRA dropout logs the same losses to the last bit, and the fused run really fused.
    import train_sft

    def train(out, *extra):
        branch_calls.clear()
        code = train_sft.main(["--config", str(ROOT / "configs" / "tiny.yaml"),
                               "--dataset_name", str(ROOT / "data" / "sql_create_context_sample.jsonl"),
                               "--output_dir", str(out), "--max_steps", "5", "--eval_steps", "5", "--save_steps", "5",
                               "--logging_steps", "1", "--lora_dropout", "0.1", *extra])  # fmt: skip
        assert code == 0
        history = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["log_history"]
        return [e["loss"] for e in history if "loss" in e], len(branch_calls)

    losses, calls = train(tmp_path / "fused")
    peft_losses, peft_calls = train(tmp_path / "peft", "--fused_lora", "false")
    assert len(losses) == 5 and losses == peft_losses
    assert peft_calls == 0 and calls >= 5 * 12  # every step's forward through all 12 layers (evaluation adds more)
