"""Proof that the pipeline learns: pretrain a small StarCoder2 from scratch on SQL, fine-tune it with
the project's recipe, score both on Spider dev with the project's harness.

Real StarCoder2 weights cannot be downloaded here, so the base model is made: a ~27M-parameter
StarCoder2 pretrained (full fine-tuning of a random init through train_sft.py's raw-sql path) on
Spider's *training* SQL and schemas. Then `train_sft.py --config configs/starcoder2-3b-sql.yaml`
(QLoRA, packed 512, completion-only loss) on the 3,961 sql-create-context rows from Spider's
training databases, contamination-filtered against Spider dev, and `--eval_spider` scores base vs
adapter. A bug in masking, packing, EOS, the prompt or SQL extraction shows up as no gain.

    python bench/learning_proof.py --shared ../shared --out runs/proof            # GPU, ~8 min on an H100
    python bench/learning_proof.py --shared ../shared --out runs/proof-smoke --smoke   # CPU, wiring only
"""

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import sqlglot
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train_sft  # noqa: E402
from starsql.schema import spider_create_tables  # noqa: E402
from starsql.tiny import EOS  # noqa: E402


def rename_identifiers(table: dict, trees: list, pool: list[str], rng: random.Random) -> tuple[dict, list[str]]:
    """The same database with every table and column renamed (consistently in schema and queries).

    A small model trained on 146 schemas memorises them; renamed copies force it to read the
    identifiers from the schema in front of it, which is what unseen Spider dev databases need."""
    from sqlglot import exp

    names = {n.lower() for n in table["table_names_original"]} | {c.lower() for _, c in table["column_names_original"][1:]}
    mapping = dict(zip(sorted(names), rng.sample(pool, len(names))))
    renamed = dict(table)
    renamed["table_names_original"] = [mapping[n.lower()] for n in table["table_names_original"]]
    renamed["column_names_original"] = [[i, c if i < 0 else mapping[c.lower()]] for i, c in table["column_names_original"]]
    queries = []
    for tree in trees:
        tree = tree.copy()
        for node in list(tree.find_all(exp.Table, exp.Column)):
            if node.name.lower() in mapping:
                node.set("this", exp.to_identifier(mapping[node.name.lower()]))
        queries.append(tree.sql(dialect="sqlite") + ";")
    return renamed, queries


def pretraining_corpus(shared: Path, out: Path, renamed_copies: int = 16, seed: int = 0) -> Path:
    """SQL files of Spider's training databases: the schema, then queries on it. No questions.
    Each database appears with its own names and in `renamed_copies` renamed copies."""
    dev_dbs = {e["db_id"] for e in json.loads((shared / "spider_dev" / "dev.json").read_text())}
    tables = {t["db_id"]: t for t in json.loads((shared / "spider_dev" / "tables.json").read_text())}
    queries, trees = defaultdict(list), defaultdict(list)
    for line in tqdm((shared / "spider_train_gold.sql").read_text().splitlines(), desc="Parsing training SQL"):
        sql, db_id = line.rsplit("\t", 1)
        if db_id not in dev_dbs:
            queries[db_id].append(" ".join(sql.split()) + ";")
            try:
                trees[db_id].append(sqlglot.parse_one(sql, read="sqlite"))
            except sqlglot.errors.ParseError:
                pass
    keywords = {k.lower() for k in sqlglot.tokens.Tokenizer.KEYWORDS}
    pool = sorted({n for db_id in queries for n in tables[db_id]["table_names_original"]}
                  | {c for db_id in queries for _, c in tables[db_id]["column_names_original"][1:]})
    pool = [n for n in pool if n.replace("_", "").isalnum() and not n[0].isdigit() and n.lower() not in keywords]
    rng = random.Random(seed)
    docs = []
    for db_id in tqdm(sorted(queries), desc="Pretraining corpus"):
        for copy in range(8 + renamed_copies):
            if copy < 8:
                table, sample = tables[db_id], rng.sample(queries[db_id], min(12, len(queries[db_id])))
            else:
                table, sample = rename_identifiers(tables[db_id], rng.sample(trees[db_id], min(12, len(trees[db_id]))), pool, rng)
            docs.append({"content": spider_create_tables(table) + "\n\n" + "\n".join(sample)})
    rng.shuffle(docs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return out


def build_base(shared: Path, out: Path, smoke: bool) -> Path:
    """A fresh StarCoder2 (random init) and a BPE tokenizer trained on the SQL, schemas and questions."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Starcoder2Config, Starcoder2ForCausalLM

    texts = [line.rsplit("\t", 1)[0] for line in (shared / "spider_train_gold.sql").read_text().splitlines()]
    texts += [spider_create_tables(t) for t in json.loads((shared / "spider_dev" / "tables.json").read_text())]
    texts += [r["question"] for r in json.loads((shared / "sql_create_context_spider" / "train.json").read_text())]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048 if smoke else 8192, special_tokens=[EOS],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    size = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4) if smoke else \
        dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8)
    torch.manual_seed(0)
    config = Starcoder2Config(vocab_size=len(fast), num_key_value_heads=size["num_attention_heads"] // 2,
                              max_position_embeddings=2048, bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id,
                              use_bias=True, tie_word_embeddings=True, **size)
    model = Starcoder2ForCausalLM(config)
    print(f"Base model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocab {len(fast)}")
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


SMOKE_SFT = ["--max_steps", "10", "--eval_steps", "5", "--save_steps", "10"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "proof")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes and few steps: checks the wiring on a CPU.")
    parser.add_argument("--pretrain_steps", type=int, default=3000)
    parser.add_argument("--pretrain_batch_size", type=int, default=32, help="512-token rows per pretraining step.")
    parser.add_argument("--renamed_copies", type=int, default=64, help="Renamed copies of each training database.")
    parser.add_argument("--sft_learning_rates", default="2e-4", help="Comma-separated; the recipe's is 2e-4.")
    args = parser.parse_args()
    spider = args.shared / "spider_dev"
    started = time.time()
    steps = 20 if args.smoke else args.pretrain_steps
    limit = ["--eval_limit", "12"] if args.smoke else []

    init = build_base(args.shared, args.out / "init", args.smoke)
    corpus = pretraining_corpus(args.shared, args.out / "pretrain_corpus.jsonl", args.renamed_copies)
    code = train_sft.main([
        "--model_name_or_path", str(init), "--use_peft", "false", "--load_in_4bit", "false", "--dtype", "float32",
        "--dataset_name", str(corpus), "--dataset_format", "raw-sql", "--text_column", "content",
        # Pretraining packs the classic way: rows cut at 512 tokens, plain causal attention.
        "--packing_strategy", "wrapped",
        "--output_dir", str(args.out / "base"), "--max_steps", str(steps), "--learning_rate", "1e-3",
        "--warmup_steps", str(steps // 20), "--per_device_train_batch_size", str(args.pretrain_batch_size), "--gradient_accumulation_steps", "1",
        "--gradient_checkpointing", "false", "--eval_fraction", "0.02", "--eval_steps", str(max(steps // 5, 1)),
        "--save_steps", str(steps), "--logging_steps", str(max(steps // 50, 1)), "--weight_decay", "0.1",
        "--license", "cc-by-sa-4.0", "--auto_resume", "false",
    ])
    assert code == 0, "pretraining failed"
    pretrain_s = time.time() - started

    results = {"pretrain_steps": steps, "pretrain_wall_s": pretrain_s, "runs": {}}
    for lr in args.sft_learning_rates.split(","):
        out = args.out / f"sft-lr{lr}"
        t0 = time.time()
        code = train_sft.main([
            "--config", str(ROOT / "configs" / "starcoder2-3b-sql.yaml"), "--model_name_or_path", str(args.out / "base"),
            "--dataset_name", str(args.shared / "sql_create_context_spider" / "train.json"),
            "--contamination_eval", str(spider / "dev.json"), "--output_dir", str(out), "--learning_rate", lr,
            "--eval_spider", str(spider), "--eval_generation_batch_size", "64", "--license", "cc-by-sa-4.0",
            # The recipe's 4 x 512 tokens per optimizer step, as one micro-batch of 4 (the same
            # update, 4x fewer kernel launches for so small a model).
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "false",
            "--auto_resume", "false", *(SMOKE_SFT if args.smoke else []),
            *limit,
        ])
        assert code == 0, f"fine-tuning with lr {lr} failed"
        reports = json.loads((out / "eval_results.json").read_text())
        # The adapter was trained on the 4-bit base; also score it that way (the app's small-card mode).
        from starsql.evaluate import evaluate_model

        reports["adapter_on_4bit_base"] = evaluate_model(
            str(args.out / "base"), str(out), spider_dir=spider, out_dir=out / "eval_spider_4bit", batch_size=64,
            load_in_4bit=True, limit=12 if args.smoke else None,
        )["adapter"]
        results["runs"][lr] = {"wall_s": time.time() - t0, **{k: {m: reports[k][m] for m in ("execution_accuracy", "exact_match", "valid_sql_rate", "label")} | {"by_hardness": {h: v["execution_accuracy"] for h, v in reports[k]["by_hardness"].items()}} for k in reports}}
    (args.out / "proof.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
