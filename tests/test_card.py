"""The model card's data section: a mixture's sources, distractor tables, filters and prompt lengths."""

from starsql.train.card import CardInfo, card_metadata, render_model_card


def source(name, fmt, **counts):
    return {"source": name, "format": fmt, "loaded": 100, "dropped": {"contaminated": 2}, "train_rows": 90, "eval_rows": 8,
            "distractors_added": 0, "rows_with_distractors": 0, **counts}


def test_the_card_names_the_mixture_its_counts_filters_and_prompt_lengths():
    report = {
        "source": "b-mc2/sql-create-context, xlangai/spider", "format": "spider, sql-create-context", "loaded": 200,
        "train_rows": 240, "eval_rows": 16, "mixture": "datasets.interleave_datasets, weights 0.8, 0.2, seed 0",
        "sources": [source("b-mc2/sql-create-context", "sql-create-context", distractors_added=150, rows_with_distractors=70,
                           weight=0.8, mixture_rows=192),
                    source("xlangai/spider", "spider", weight=0.2, mixture_rows=48)],
        "filters": ["exact duplicates", "prompt + SQL + EOS over 1024 tokens", "questions or databases shared with dev.json"],
        "prompt_lengths": {"train: xlangai/spider (spider)": {"rows": 98, "p50": 300, "p90": 700, "p99": 900, "max": 1000},
                           "Spider dev (whole schemas)": {"rows": 1034, "p50": 341, "p90": 804, "p99": 1083, "max": 1094}},
    }  # fmt: skip
    info = CardInfo(base_model="bigcode/starcoder2-3b", model_id="acme/sql", datasets=["b-mc2/sql-create-context", "xlangai/spider"],
                    hyperparameters={"max_length": 1024}, data_report=report)  # fmt: skip
    card = render_model_card(info)
    assert "a mixture of 2 sources (datasets.interleave_datasets, weights 0.8, 0.2, seed 0)" in card
    assert ("b-mc2/sql-create-context (sql-create-context); 100 rows loaded, dropped: 2 contaminated; 150 distractor tables "
            "added to 70 schemas") in card
    assert "xlangai/spider (spider); 100 rows loaded" in card and "weight 0.2: 48 rows of the mixture" in card
    assert "- Filters (every source): exact duplicates; prompt + SQL + EOS over 1024 tokens; questions or databases shared with dev.json." in card
    assert "| Spider dev (whole schemas) | 1,034 | 341 | 804 | 1,083 | 1,094 |" in card and "packed into 1024-token sequences" in card
    assert card_metadata(info).datasets == ["b-mc2/sql-create-context", "xlangai/spider"]


def test_a_single_source_card_keeps_its_one_line():
    info = CardInfo(base_model="tiny", model_id="out", datasets=["data/x.jsonl"], hyperparameters={},
                    data_report=source("data/x.jsonl", "sql-create-context"))
    assert "- Data: data/x.jsonl (sql-create-context); 100 rows loaded, dropped: 2 contaminated; 90 training rows, 8 eval rows." in render_model_card(info)
