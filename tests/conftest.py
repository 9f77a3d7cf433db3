"""Shared fixtures: a tiny StarCoder2 built once per session, and one short QLoRA run on it."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under xdist each worker gets its share of the cores: with torch's default (a thread per core) the workers'
# threads, and their training subprocesses', spin-wait against each other: more CPU time, no sooner done.
if os.environ.get("PYTEST_XDIST_WORKER"):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """Build the tiny model under a per-session cache, so tests never reuse a stale one."""
    cache = tmp_path_factory.mktemp("starsql-cache")
    os.environ["STARSQL_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_path(tiny_cache):
    from starsql.tiny import build_tiny_model

    return build_tiny_model()


@pytest.fixture(scope="session")
def tiny_run(tiny_model_path, tmp_path_factory):
    """Output folder of `train_sft.py --config configs/tiny.yaml` (adapter, card, curves)."""
    import train_sft

    out = tmp_path_factory.mktemp("tiny-run")
    code = train_sft.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(out),
                           "--dataset_name", str(ROOT / "data" / "sql_create_context_sample.jsonl")])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def spider_dir():
    path = SHARED / "spider_dev"
    if not (path / "dev.json").is_file():
        pytest.skip("../shared/spider_dev is not here")
    return path


# What bench/learning_proof.py reads from ../shared (Spider dev, its training SQL, sql-create-context rows).
LEARNING_PROOF_DATA = ("spider_dev/dev.json", "spider_dev/tables.json", "spider_train_gold.sql",
                       "sql_create_context_spider/train.json")


@pytest.fixture(scope="session")
def shared_dir():
    """../shared with the learning proof's data; the test skips in a clone without it (a user's clone)."""
    missing = [name for name in LEARNING_PROOF_DATA if not (SHARED / name).is_file()]
    if missing:
        pytest.skip(f"../shared lacks {', '.join(missing)}")
    return SHARED
