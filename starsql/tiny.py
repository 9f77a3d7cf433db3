"""A tiny random StarCoder2 and a tokenizer trained on the fly, for CPU smoke runs and tests.

`model_name_or_path: tiny-starcoder2` in a config builds it (once, cached) instead of
downloading weights, so the whole pipeline runs offline on a laptop in minutes. It has the real
architecture (grouped-query attention, biases, tied embeddings, the same projection names), so
LoRA targets, 4-bit layers, packing and generation are exercised for real; its output is noise.
"""

import json
import os
from pathlib import Path

TINY_MODEL = "tiny-starcoder2"
EOS = "<|endoftext|>"
DATA = Path(__file__).resolve().parent.parent / "data" / "sql_create_context_sample.jsonl"


def tiny_model_dir() -> Path:
    cache = Path(os.environ.get("STARSQL_CACHE", Path.home() / ".cache" / "starsql"))
    return cache / "tiny-starcoder2-v1"


def _corpus(data_file: Path) -> list[str]:
    from .prompt import build_prompt, format_completion

    rows = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
    return [build_prompt(r["context"], r["question"]) + format_completion(r["answer"]) for r in rows]


def build_tiny_model(out_dir: str | Path | None = None, vocab_size: int = 1024, seed: int = 0) -> Path:
    """Write a tiny StarCoder2 and its tokenizer to `out_dir` (default: the cache) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Starcoder2Config, Starcoder2ForCausalLM

    out = Path(out_dir) if out_dir else tiny_model_dir()
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_corpus(DATA), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)

    torch.manual_seed(seed)
    config = Starcoder2Config(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
        use_bias=True,
        tie_word_embeddings=True,
    )
    model = Starcoder2ForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")  # write, then rename: no half-built model is ever cached
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    if not out.exists():  # another process may have built it meanwhile
        tmp.replace(out)
    return out


def resolve_model_path(name: str) -> str:
    """`name` itself, or the tiny model's folder (built on first use) for `tiny-starcoder2`."""
    return str(build_tiny_model()) if name == TINY_MODEL else name


if __name__ == "__main__":
    import sys

    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else None))
