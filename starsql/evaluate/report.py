"""The evaluation's outputs: report.json, a markdown table, a chart by hardness, per-example rows.

One model writes its files to the output folder; several (base and adapter) each get a subfolder
for report.json / per_example.jsonl / preds.sql, and the folder's report.json maps label -> report.
"""

import json
from pathlib import Path


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(reports: dict[str, dict]) -> str:
    """One row per metric and hardness level, one column per model (e.g. base, adapter)."""
    labels = list(reports)
    first = next(iter(reports.values()))
    lines = [f"| metric | {' | '.join(labels)} |", "|---|" + "---:|" * len(labels)]
    metrics = [("execution_accuracy", "execution accuracy"), ("exact_match", "exact match"), ("valid_sql_rate", "valid SQL")]
    for key, name in metrics:
        lines.append(f"| {name} | {' | '.join(_fmt(reports[label][key]) for label in labels)} |")
    for level, stats in first["by_hardness"].items():
        cells = " | ".join(_fmt(reports[label]["by_hardness"][level]["execution_accuracy"]) for label in labels)
        lines.append(f"| EX {level} (n={stats['count']}) | {cells} |")
    header = f"{first['label']}: {first['scored']:,} scored, {first['skipped']:,} skipped of {first['total']:,}."
    if "distinct" in first:  # executed: say how DISTINCT was treated, the two rules give different numbers
        header += f" Execution match: {first['distinct']}."
    return header + "\n\n" + "\n".join(lines) + "\n"


def plot_by_hardness(reports: dict[str, dict], path: str | Path) -> Path | None:
    """Bar chart of execution accuracy by hardness (and overall), models side by side. None without data."""
    import matplotlib

    matplotlib.use("Agg")  # no display on evaluation machines
    import matplotlib.pyplot as plt

    first = next(iter(reports.values()))
    if first["execution_accuracy"] is None or not first["by_hardness"]:
        return None
    groups = [*first["by_hardness"], "all"]
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, report) in enumerate(reports.items()):
        values = [report["by_hardness"][g]["execution_accuracy"] for g in groups[:-1]] + [report["execution_accuracy"]]
        positions = [x + (i - (len(reports) - 1) / 2) * width for x in range(len(groups))]
        bars = ax.bar(positions, [v or 0.0 for v in values], width, label=label)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8, padding=2)
    counts = [first["by_hardness"][g]["count"] for g in groups[:-1]] + [first["scored"]]
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={n})" for g, n in zip(groups, counts)])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("execution accuracy")
    ax.set_title(f"Spider dev, {first['label']}")
    if len(reports) > 1:
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(reports: dict[str, dict], details: dict[str, list[dict]], out_dir: str | Path,
                  predictions: dict[str, list[str]] | None = None) -> Path:
    """report.json, report.md, accuracy_by_hardness.png, per_example.jsonl (+ preds.sql) in out_dir.
    Several models: each gets a subfolder, and out_dir/report.json maps label -> report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    several = len(reports) > 1
    for label, report in reports.items():
        folder = out / label if several else out
        folder.mkdir(exist_ok=True)
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (folder / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in details[label]))
        if predictions is not None:
            (folder / "preds.sql").write_text("".join(p + "\n" for p in predictions[label]))
    if several:
        (out / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
    (out / "report.md").write_text(markdown_table(reports))
    plot_by_hardness(reports, out / "accuracy_by_hardness.png")
    return out
