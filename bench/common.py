"""Shared helpers of the speed benchmarks: the random StarCoder2-3B, its tokenizer, the data, JSON lines.

Real StarCoder2-3B weights cannot be downloaded on the benchmark machines, so the model is built
from its config with random weights (speed and memory depend on shapes, not on values) and saved
once, so every configuration loads it through `from_pretrained` like a real checkpoint.

    python bench/common.py /tmp/sc2-3b-random          # build it (GPU, bf16) if missing
"""

import ast
import gc
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from starsql.prompt import build_prompt, format_completion  # noqa: E402

DATA = ROOT / "data" / "sql_create_context_sample.jsonl"
EOS = "<|endoftext|>"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]

# bigcode/starcoder2-3b's config.json, less the weights. Its dropouts (0.1, where Starcoder2Config's defaults are 0)
# are active in training: they cost time and memory, and flex_attention refuses attention dropout.
STARCODER2_3B = dict(
    hidden_size=3072, num_hidden_layers=30, num_attention_heads=24, num_key_value_heads=2,
    intermediate_size=12288, vocab_size=49152, rope_theta=999999.4420358813, sliding_window=4096,
    use_bias=True, tie_word_embeddings=True, max_position_embeddings=16384, norm_epsilon=1e-5,
    hidden_act="gelu_pytorch_tanh", initializer_range=0.018042,
    attention_dropout=0.1, residual_dropout=0.1, embedding_dropout=0.1,
)  # fmt: skip
# Same architecture, small enough for a CPU smoke run in seconds.
SMOKE = dict(
    STARCODER2_3B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=1024
)


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def peak_reserved_gib() -> float | None:
    """What the caching allocator held at most: closer than peak_gib to what a smaller card must have free."""
    return round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None


def free_memory():
    """Give back what the previous configuration held, so each starts from an empty card."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def examples() -> list[dict]:
    """The repo's sql-create-context rows as {prompt, completion}, the training template."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return [
        {"prompt": build_prompt(r["context"], r["question"]), "completion": format_completion(r["answer"])} for r in rows
    ]


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the repo's SQL rows (as starsql/tiny.py does): real text, real lengths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar goes to stdout, among the JSON lines
    )
    tokenizer.train_from_iterator([e["prompt"] + e["completion"] for e in examples()], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def setting(item: str) -> tuple[str, object]:
    """KEY=VALUE from the command line: the key and the value as a Python literal (True, 0.5, "text")."""
    key, value = item.split("=", 1)
    return key, ast.literal_eval(value)


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1 (for an app a benchmark starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ensure_model(model_dir: str | Path, smoke: bool = False, seed: int = 0, shape: dict | None = None,
                 visible: bool = False) -> Path:
    """Build the random model + tokenizer in `model_dir` unless it is already there (`shape`: its config, by
    default StarCoder2-3B's, or SMOKE's with `smoke`). `visible`: every token it writes is text (visible_tokens_only)."""
    from transformers import AutoModelForCausalLM, Starcoder2Config

    out = Path(model_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    started = time.perf_counter()
    shape = shape or (SMOKE if smoke else STARCODER2_3B)
    # The tokenizer's vocabulary is smaller than the model's: ids stay valid, the embedding keeps its real size.
    tokenizer = build_tokenizer(min(8192, shape["vocab_size"]))
    config = Starcoder2Config(**shape, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    # Initialised directly on the GPU in bf16: seconds, where 3B parameters on the CPU take minutes.
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with device():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if visible:
        visible_tokens_only(model, tokenizer)
    tmp = out.with_name(out.name + ".tmp")  # write, then rename: a killed build leaves no half model behind
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    free_memory()
    if not out.exists():
        tmp.replace(out)
    print(f"Built random model in {out} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return out


def visible_tokens_only(model, tokenizer):
    """Make the random model write only tokens a user sees, as a trained model's answers are: zero the output rows
    of every other id, so that their logits (0) lose to the largest of the rest's random ones. Others: the ids past the
    tokenizer's vocabulary (most of the model's, which decode to nothing), special tokens, bytes of half a character,
    blanks, and what would end an answer (";" and "-", as in "\n--"), so that every answer runs to its budget. Without
    this, an answer's first text through the app comes only after the model's first visible token: the time to a
    first token read by a client would be the random model's, not the server's. Same shapes, same work a step."""
    keep = torch.zeros(model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id], skip_special_tokens=True)
        keep[token_id] = bool(text.strip()) and not any(mark in text for mark in ("\ufffd", ";", "-"))
    with torch.no_grad():
        weight = model.get_output_embeddings().weight  # tied: the input rows of those ids too, which no answer holds
        weight[~keep.to(weight.device)] = 0


def bnb_4bit_config():
    """QLoRA's quantization: NF4, double quantization, bf16 compute (fp32 on CPU)."""
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def emit(record: dict, out: str | None):
    """One JSON line to stdout and, when asked, appended to `out` (flushed: a killed run keeps its lines)."""
    line = json.dumps(record, default=str)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def run_child(argv: list[str], log_path: Path, timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """Run a command with its output in `log_path`; (exit code or None on timeout, last lines of the log)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                   env={**os.environ, **(env or {})})
        try:
            code = process.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the child's own process group: it and its compile workers, nothing else
            process.wait()
            code = None
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    return code, "\n".join(tail)


def table(records: list[dict], columns: list[str]) -> str:
    """A fixed-width summary table of the JSON lines."""

    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return "" if value is None else str(value)

    rows = [[cell(r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def ratio(value, baseline) -> float | None:
    if not value or not baseline:
        return None
    return round(value / baseline, 3)


def max_rel_diff(a: list[float], b: list[float], n: int = 5) -> float | None:
    pairs = list(zip(a[:n], b[:n]))
    if not pairs or any(math.isnan(x) or math.isnan(y) for x, y in pairs):
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the random StarCoder2-3B (or the smoke model) if missing.")
    parser.add_argument("model_dir")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    print(ensure_model(args.model_dir, smoke=args.smoke))
