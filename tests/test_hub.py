"""Pushing, exercised through huggingface_hub's real HTTP calls against a fake Hub on 127.0.0.1."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from fake_hub import FakeHub


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def train(tmp_path, hub, *extra, token="hf_good"):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    command = [sys.executable, str(ROOT / "train_sft.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
               "--dataset_name", str(ROOT / "data" / "sql_create_context_sample.jsonl"),
               "--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_push_uploads_adapter_tokenizer_card_and_curves_once(tmp_path, hub, tiny_model_path):
    result = train(tmp_path, hub, "--push_to_hub", "--hub_model_id", "acme/tiny-sql")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert hub.repos == {"acme/tiny-sql"} and len(hub.commits) == 1
    files = set(hub.commits[0]["files"])
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md", "training_curves.png"} <= files
    assert not any(f.startswith("checkpoint-") or f.endswith(".bin") for f in files)
    card = hub.commits[0]["files"]["README.md"].decode()
    assert "# acme/tiny-sql" in card and "PeftModel.from_pretrained(base, 'acme/tiny-sql')" in card


def test_no_rights_stops_before_training(tmp_path, hub):
    result = train(tmp_path, hub, "--push_to_hub", "--hub_model_id", "someone-else/tiny-sql")
    assert result.returncode != 0
    assert "Cannot create or write someone-else/tiny-sql as alice" in result.stderr
    assert not (tmp_path / "out").exists() and hub.commits == []


def test_bad_token_stops_before_training(tmp_path, hub):
    result = train(tmp_path, hub, "--push_to_hub", "--hub_model_id", "alice/tiny-sql", token="hf_revoked")
    assert result.returncode != 0 and "No valid Hugging Face token" in result.stderr
    assert not (tmp_path / "out").exists()


def test_repo_id_without_namespace_is_refused(tmp_path, hub):
    result = train(tmp_path, hub, "--push_to_hub", "--hub_model_id", "tiny-sql")
    assert result.returncode != 0 and "--hub_model_id must be USER/NAME" in result.stderr
