"""Evaluation harness: execution accuracy, exact match and valid-SQL rate on Spider dev, by hardness.

    python -m starsql.evaluate --predictions preds.sql --spider ../shared/spider_dev --out runs/eval
    python -m starsql.evaluate --model bigcode/starcoder2-3b --adapter runs/sql --compare \\
        --spider ../shared/spider_dev --limit 200 --out runs/eval
    python -m starsql.evaluate --schema_only heldout.jsonl --model tiny-starcoder2 --adapter runs/tiny

Predictions are Spider's official format: one SQL per line, in dev.json order; an empty line is a
(wrong) prediction. In model mode the predictions are generated first, with the project's prompt.
Spider's shared dev copy lacks the `wta_1` database, so its 62 questions are skipped and the
report says so: "EX on 972/1,034 (no wta_1)".

Execution match removes DISTINCT from gold and predicted SQL before running them, as the
test-suite evaluator does by default (published Spider execution accuracies use that default);
--keep_distinct runs them as written. The report says which rule was used.

Outputs in --out: report.json, report.md, accuracy_by_hardness.png, per_example.jsonl and, in
model mode, preds.sql. With --compare each model's report.json / per_example.jsonl / preds.sql
go to out/base/ and out/adapter/, and out/report.json maps "base" and "adapter" to their reports.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from .report import markdown_table, write_outputs
from .score import ScoringCache, check_databases, score_examples, score_schema_only_examples, summarize
from .spider import (
    DEFAULT_MAX_ROWS,
    DEFAULT_TIMEOUT_S,
    KNOWN_MISSING_DBS,
    Example,
    InputError,
    load_schema_only,
    load_spider,
    read_predictions,
)
from ..prompt import build_prompt


def generate_predictions(base: str, adapter: str | None, examples: list[Example], batch_size: int = 8,
                         max_new_tokens: int = 256, load_in_4bit: bool = False) -> list[str]:
    """Greedy SQL for each example, one line each (preds.sql holds one prediction per line)."""
    import gc

    import torch

    from ..serve.decode import generate_sql
    from ..serve.load import load_for_inference

    model, tokenizer = load_for_inference(base, adapter, load_in_4bit=load_in_4bit)
    prompts = [build_prompt(example.schema, example.question) for example in examples]
    predictions = generate_sql(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # room for the next model under --compare
    return [p.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").strip() for p in predictions]


def model_runs(base: str, adapter: str | None, compare: bool) -> list[tuple[str, str | None]]:
    """(label, adapter) for each model to evaluate."""
    if compare:
        if not adapter:
            raise InputError("--compare needs --adapter: it compares the base model with base + adapter.")
        return [("base", None), ("adapter", adapter)]
    return [("adapter", adapter)] if adapter else [("base", None)]


def evaluate_model(
    base: str,
    adapter: str | None = None,
    spider_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    compare: bool = False,
    max_new_tokens: int = 256,
    timeout: float = DEFAULT_TIMEOUT_S,
    schema_only: str | Path | None = None,
    load_in_4bit: bool = False,
    skip_missing: bool = False,
    keep_distinct: bool = False,
) -> dict[str, dict]:
    """Generate and score; returns {"base": report} / {"adapter": report} / both with compare=True.

    Evaluates on Spider dev (`spider_dir`) or a schema-only file (`schema_only`). Inputs are
    checked (databases present and readable) before any model is loaded. keep_distinct: execution
    match runs DISTINCT as written (default: removed from both queries, the test-suite default)."""
    if (spider_dir is None) == (schema_only is None):
        raise InputError("Give exactly one of spider_dir (Spider dev) and schema_only (.jsonl of question/context/answer).")
    examples = load_spider(spider_dir, limit) if spider_dir is not None else load_schema_only(schema_only, limit)
    reports, details, predictions = {}, {}, {}
    with ScoringCache() as cache:  # shared by the models of this call: each gold query runs once
        if spider_dir is not None:
            check_databases(spider_dir, examples, skip_missing, cache)
        for label, run_adapter in model_runs(base, adapter, compare):
            print(f"Evaluating {label}: {base}" + (f" + {run_adapter}" if run_adapter else ""), flush=True)
            predictions[label] = generate_predictions(base, run_adapter, examples, batch_size, max_new_tokens, load_in_4bit)
            if spider_dir is not None:
                details[label] = score_examples(
                    predictions[label], examples, spider_dir, timeout, skip_missing=skip_missing, cache=cache,
                    keep_distinct=keep_distinct,
                )
            else:
                details[label] = score_schema_only_examples(predictions[label], examples, cache=cache)
            reports[label] = summarize(details[label], keep_distinct) | {"model": base, "adapter": run_adapter}
    if out_dir is not None:
        write_outputs(reports, details, out_dir, predictions)
    return reports


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m starsql.evaluate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", help="File of predictions: one SQL per line, in dev.json order.")
    source.add_argument("--model", help="Base model (Hub id, folder, or tiny-starcoder2) to generate predictions with.")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--spider", help="Spider dev folder: dev.json, tables.json, dev_gold.sql, database/.")
    data.add_argument("--schema_only", help="JSON Lines of {question, context, answer}: exact match and compile check only.")
    parser.add_argument("--adapter", help="LoRA adapter (folder or Hub id) on top of --model.")
    parser.add_argument("--compare", action="store_true", help="Evaluate --model alone and with --adapter, side by side.")
    parser.add_argument("--limit", type=int, help="Only the first N questions.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--load_in_4bit", action="store_true", help="Load the base model in 4-bit NF4 for generation.")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="Seconds per predicted query.")
    parser.add_argument("--max_rows", type=int, default=DEFAULT_MAX_ROWS, help="A prediction returning more rows is wrong.")
    parser.add_argument(
        "--skip_missing_databases", action="store_true",
        help=f"Skip questions of any absent database, not only {', '.join(sorted(KNOWN_MISSING_DBS))}.",
    )
    parser.add_argument(
        "--keep_distinct", action="store_true",
        help="Run gold and predicted SQL with their DISTINCT; by default it is removed from both before execution, "
        "as the test-suite evaluator does (its --keep_distinct keeps it).",
    )
    parser.add_argument("--out", default="runs/eval", help="Output folder (default: runs/eval).")
    args = parser.parse_args(argv)
    if args.model is None and (args.adapter or args.compare):
        parser.error("--adapter and --compare need --model.")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1.")
    return args


def _score_file(args) -> dict[str, dict]:
    """Scoring mode: a predictions file against Spider dev or a schema-only set."""
    if args.spider:
        examples = load_spider(args.spider, args.limit)
        predictions = read_predictions(args.predictions, examples)
        details = score_examples(
            predictions, examples, args.spider, args.timeout, args.max_rows, args.skip_missing_databases,
            keep_distinct=args.keep_distinct,
        )
    else:
        examples = load_schema_only(args.schema_only, args.limit)
        details = score_schema_only_examples(read_predictions(args.predictions, examples), examples)
    reports = {"predictions": summarize(details, args.keep_distinct) | {"predictions_file": str(args.predictions)}}
    write_outputs(reports, {"predictions": details}, args.out)
    return reports


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        if args.predictions:
            reports = _score_file(args)
        else:
            reports = evaluate_model(
                args.model, args.adapter, args.spider, args.out, args.limit, args.batch_size, args.compare,
                args.max_new_tokens, args.timeout, args.schema_only, args.load_in_4bit, args.skip_missing_databases,
                args.keep_distinct,
            )
    except (InputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for label, report in reports.items():
        print(f"[{label}] {json.dumps({k: v for k, v in report.items() if k != 'by_hardness'})}")
    print(markdown_table(reports))
    print(f"Wrote {args.out}/ in {time.perf_counter() - started:.1f} s")
    return 0
