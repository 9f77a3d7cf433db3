"""The model card (README.md) written beside the adapter and pushed with it."""

import platform
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from ..prompt import PROMPT_TEMPLATE, build_prompt

EXAMPLE_SCHEMA = "CREATE TABLE singer (singer_id INTEGER, name VARCHAR, country VARCHAR, age INTEGER)"
EXAMPLE_QUESTION = "How many singers are from France?"


@dataclass
class CardInfo:
    base_model: str
    model_id: str  # where the adapter lives: a Hub id, or the output folder
    datasets: list[str]
    hyperparameters: dict
    data_report: dict
    final_train_loss: float | None = None
    final_eval_loss: float | None = None
    hardware: str = ""
    wall_time_s: float = 0.0
    license: str = "bigcode-openrail-m"
    space_id: str | None = None
    use_peft: bool = True
    # {"name": ..., "type": ..., "value": ..., "dataset": ..., "dataset_type": ...}, for model-index.
    metrics: list[dict] = field(default_factory=list)
    extra_sections: list[str] = field(default_factory=list)  # markdown appended before the limitations
    images: list[str] = field(default_factory=list)  # file names beside the card


def framework_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions


def card_metadata(info: CardInfo) -> ModelCardData:
    hub_datasets = [d for d in info.datasets if "/" in d and not Path(d).exists()]
    eval_results = [
        EvalResult(
            task_type="text-to-sql",
            task_name="Text-to-SQL",
            dataset_type=m.get("dataset_type", m["dataset"]),
            dataset_name=m["dataset"],
            metric_type=m["type"],
            metric_name=m["name"],
            metric_value=m["value"],
        )
        for m in info.metrics
    ]
    return ModelCardData(
        base_model=info.base_model,
        library_name="peft" if info.use_peft else "transformers",
        datasets=hub_datasets or None,
        tags=["text-to-sql", "sql", "code", "trl", "sft"] + (["lora", "qlora"] if info.use_peft else []),
        license=info.license,
        pipeline_tag="text-generation",
        model_name=info.model_id,
        eval_results=eval_results or None,
    )


def _usage_snippets(info: CardInfo) -> str:
    load = (
        f"base = AutoModelForCausalLM.from_pretrained({info.base_model!r}, dtype=torch.bfloat16, device_map=\"auto\")\n"
        f"model = PeftModel.from_pretrained(base, {info.model_id!r}).merge_and_unload()"
        if info.use_peft
        else f"model = AutoModelForCausalLM.from_pretrained({info.model_id!r}, dtype=torch.bfloat16, device_map=\"auto\")"
    )
    space = info.space_id or "YOUR_USER/YOUR_SPACE"
    return f"""### transformers + PEFT

```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({info.model_id!r})
{load}

prompt = {build_prompt(EXAMPLE_SCHEMA, EXAMPLE_QUESTION)!r}
inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=128, do_sample=False, eos_token_id=tokenizer.eos_token_id)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The prompt must be built exactly as above (`starsql.prompt.build_prompt` in the training repo).

### The Space, from Python (`gradio_client`)

```python
from gradio_client import Client

client = Client({space!r})
result = client.predict({EXAMPLE_QUESTION!r}, {EXAMPLE_SCHEMA!r}, api_name="/sql")
print(result["sql"], result["valid"], result["error"])
```
"""


def _source_line(name: str, report: dict) -> str:
    """One source's counts: loaded, dropped by reason, distractor tables added, rows kept (and mixed)."""
    dropped = ", ".join(f"{n:,} {reason}" for reason, n in sorted(report.get("dropped", {}).items())) or "none"
    line = f"{name} ({report.get('format', '')}); {report.get('loaded', 0):,} rows loaded, dropped: {dropped};"
    if report.get("distractors_added"):
        line += (f" {report['distractors_added']:,} distractor tables added to {report['rows_with_distractors']:,}"
                 " schemas (other tables of the row's database first, then other rows');")
    line += f" {report.get('train_rows', 0):,} training rows, {report.get('eval_rows', 0):,} eval rows"
    if report.get("mixture_rows") is not None:
        line += f"; weight {report['weight']:g}: {report['mixture_rows']:,} rows of the mixture"
    return line + "."


def _data_section(info: CardInfo) -> str:
    """The data: each source's counts, the mixture, the filters and the prompts' lengths."""
    report = info.data_report
    if report.get("sources"):
        lines = [f"- Data: a mixture of {len(report['sources'])} sources ({report.get('mixture')}); "
                 f"{report.get('train_rows', 0):,} training rows, {report.get('eval_rows', 0):,} eval rows:"]
        lines += [f"  - {_source_line(source['source'], source)}" for source in report["sources"]]
    else:
        lines = [f"- Data: {_source_line(', '.join(info.datasets), report)}"]
    if report.get("filters"):
        lines.append(f"- Filters (every source): {'; '.join(report['filters'])}.")
    lengths = report.get("prompt_lengths")
    if lengths:
        rows = "\n".join(f"| {name} | {p['rows']:,} | {p['p50']:,} | {p['p90']:,} | {p['p99']:,} | {p['max']:,} |"
                         for name, p in lengths.items())
        lines.append(f"\nPrompt lengths (tokens):\n\n| prompts | rows | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|---:|\n{rows}\n")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def render_model_card(info: CardInfo) -> str:
    meta = card_metadata(info).to_yaml()
    hyper = "\n".join(f"| `{k}` | `{v}` |" for k, v in info.hyperparameters.items())
    versions = ", ".join(f"{k} {v}" for k, v in framework_versions().items())
    metrics = "\n".join(f"| {m['dataset']} | {m['name']} | {_fmt(m['value'])} |" for m in info.metrics)
    metrics_section = (
        f"## Evaluation\n\n| dataset | metric | value |\n|---|---|---|\n{metrics}\n\n" if info.metrics else ""
    )
    images = "".join(f"![{Path(name).stem}]({name})\n\n" for name in info.images)
    extra = "".join(section.strip() + "\n\n" for section in info.extra_sections)
    kind = "QLoRA/LoRA adapter" if info.use_peft else "fully fine-tuned model"
    return f"""---
{meta}
---

# {info.model_id}

A text-to-SQL {kind} for [{info.base_model}](https://huggingface.co/{info.base_model}): give it CREATE TABLE
statements and a question in plain English, it writes one SQL query. Trained with TRL's `SFTTrainer`
on question/schema/SQL pairs, packed into {info.hyperparameters.get("max_length", 512)}-token sequences, loss on the SQL only.

## Prompt template

Training, evaluation and the demo Space all use this exact template; the model's answer follows it and
ends with the tokenizer's EOS token.

```
{PROMPT_TEMPLATE}```

## Usage

{_usage_snippets(info)}
{metrics_section}## Training

{_data_section(info)}
- Final train loss: {_fmt(info.final_train_loss)}; final eval loss: {_fmt(info.final_eval_loss)}.
- Hardware: {info.hardware}; wall time: {info.wall_time_s / 60:.1f} min.
- Frameworks: {versions}.

| hyperparameter | value |
|---|---|
{hyper}

{images}{extra}## Limitations

- Accuracy: it is often wrong on complex queries (several joins, nested queries, set operations,
  window functions). Check the SQL before you trust its result.
- It only knows the schema you give it: it does not see your data, so domain terms ("active customer",
  "fiscal year") that the schema does not spell out are guessed.
- SQL dialect: trained mostly on SQLite-style SQL.
- Security: never run generated SQL with write permissions on a database that matters. Review it first;
  run it on a read-only connection.
"""


def write_model_card(output_dir: str | Path, info: CardInfo) -> Path:
    path = Path(output_dir) / "README.md"
    path.write_text(render_model_card(info))
    return path
