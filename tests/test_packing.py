"""Packing: several examples share one 512-token row but never attend to each other, and the loss
falls on the SQL (and EOS) only."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from starsql.train.data import DataArguments, prepare_datasets
from starsql.train.model import ModelArguments, load_model, load_tokenizer, lora_config
from starsql.prompt import build_prompt
from starsql.train.sft import TrainingConfig

from conftest import ROOT


def packed_batch(tmp_path, model, tokenizer, use_peft):
    from trl import SFTTrainer

    args = TrainingConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to="none", bf16=False, eval_strategy="no")
    train, _, _ = prepare_datasets(
        DataArguments(dataset_name=str(ROOT / "data" / "sql_create_context_sample.jsonl"), eval_fraction=0), tokenizer, 512
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=lora_config(ModelArguments(model_name_or_path="tiny-starcoder2")) if use_peft else None)
    return trainer, next(iter(trainer.get_train_dataloader()))


def segments(position_ids):
    starts = (position_ids == 0).nonzero().flatten().tolist() + [len(position_ids)]
    return list(zip(starts[:-1], starts[1:]))


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_packed_logits_equal_each_example_alone(tmp_path, tiny_model_path, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=attn, dtype=torch.float32)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_path)))
    trainer, batch = packed_batch(tmp_path, model, tokenizer, use_peft=False)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # padding-free: one flat row
    position_ids = batch["position_ids"][0]
    spans = segments(position_ids)
    assert len(spans) > 4, "a 512-token row should hold several examples"
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        for start, end in spans:
            alone = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-4, rtol=1e-4)
        # Control: without the position ids the examples do see each other, so the test can fail.
        leaky = model(input_ids=batch["input_ids"]).logits[0]
        start, end = spans[1]
        assert not torch.allclose(leaky[start:end], packed[start:end], atol=1e-3)


def test_labels_cover_exactly_the_sql_and_eos(tmp_path, tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_path)))
    _, batch = packed_batch(tmp_path, model, tokenizer, use_peft=False)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    for start, end in segments(batch["position_ids"][0]):
        trained = labels[start:end] != -100
        first = int(trained.nonzero()[0])
        assert trained[first:].all() and not trained[:first].any()
        prompt = tokenizer.decode(ids[start : start + first])
        completion = tokenizer.decode(ids[start + first : end])
        assert prompt.startswith("-- Database schema\n") and prompt.endswith("-- SQL:\n")
        assert completion.endswith(";" + tokenizer.eos_token) and "-- Question" not in completion
        # The prompt the model trains on is exactly what build_prompt renders (what the app sends).
        question = prompt.split("-- Question: ")[1].split("\n")[0]
        schema = prompt.split("-- Database schema\n")[1].split("\n\n-- Question")[0]
        assert prompt == build_prompt(schema, question)


def test_lora_on_all_six_projections_of_4bit_layers(tiny_model_path):
    import bitsandbytes as bnb
    from peft import get_peft_model

    args = ModelArguments(model_name_or_path=str(tiny_model_path))
    model = load_model(args)
    layer = model.model.layers[0]
    for module in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.c_fc, layer.mlp.c_proj):
        assert isinstance(module, bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.quant_type == "nf4"
    peft_model = get_peft_model(model, lora_config(args))
    adapted = {name.split(".")[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"}
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_quantized_full_finetune_is_refused():
    with pytest.raises(ValueError, match="use_peft"):
        load_model(ModelArguments(model_name_or_path="tiny-starcoder2", use_peft=False, load_in_4bit=True))
