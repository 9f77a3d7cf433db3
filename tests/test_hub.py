"""Pushing, exercised through huggingface_hub's real HTTP calls against a fake Hub on 127.0.0.1."""

import os
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from conftest import ROOT
from fake_hub import FakeHub


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def command(tmp_path, *extra) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--dataset_name", str(ROOT / "data" / "sql_create_context_sample.jsonl"),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", *extra]


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub in this process, online, against the endpoint the test sets."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    return lambda url: monkeypatch.setattr(constants, "ENDPOINT", url)


@pytest.fixture
def train(tmp_path, online, monkeypatch, capfd, tiny_model_path):
    """train_sft.main in this process, online against `hub` (its HF_ENDPOINT) with HF_TOKEN=`token`: its exit code
    and everything the process printed (capfd: loggers' writes too). The command itself: the unreachable-Hub test."""
    from huggingface_hub import constants

    import train_sft

    def run(hub, *extra, token="hf_good"):
        online(hub.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", token)
        capfd.readouterr()
        code = train_sft.main(command(tmp_path, *extra))
        stdout, stderr = capfd.readouterr()
        return SimpleNamespace(returncode=code, stdout=stdout, stderr=stderr)

    return run


def test_push_uploads_adapter_tokenizer_card_and_curves_once(hub, train):
    result = train(hub, "--push_to_hub", "--hub_model_id", "acme/tiny-sql")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert hub.repos == {"acme/tiny-sql"} and len(hub.commits) == 1
    files = set(hub.commits[0]["files"])
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md", "training_curves.png"} <= files
    assert not any(f.startswith("checkpoint-") or f.endswith(".bin") for f in files)
    card = hub.commits[0]["files"]["README.md"].decode()
    assert "# acme/tiny-sql" in card and "PeftModel.from_pretrained(base, 'acme/tiny-sql')" in card


def test_no_rights_stops_before_training(tmp_path, hub, train):
    result = train(hub, "--push_to_hub", "--hub_model_id", "someone-else/tiny-sql")
    assert result.returncode != 0
    assert "Cannot create or write someone-else/tiny-sql as alice" in result.stderr
    assert not (tmp_path / "out").exists() and hub.commits == []


def test_bad_token_stops_before_training(tmp_path, hub, train):
    result = train(hub, "--push_to_hub", "--hub_model_id", "alice/tiny-sql", token="hf_revoked")
    assert result.returncode != 0 and "No valid Hugging Face token" in result.stderr
    assert not (tmp_path / "out").exists()


def test_repo_id_without_namespace_is_refused(hub, train):
    result = train(hub, "--push_to_hub", "--hub_model_id", "tiny-sql")
    assert result.returncode != 0 and "--hub_model_id must be USER/NAME" in result.stderr


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HangUp:
    """A server on 127.0.0.1 that accepts every connection and closes it without answering."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            connection.close()

    def close(self):
        self.socket.close()


def test_an_unreachable_hub_is_not_called_a_bad_token(tmp_path):
    # HF_TOKEN set, the Hub (HF_ENDPOINT) unreachable: the message names the Hub and the network, not the token,
    # in one line, before anything is prepared.
    unreachable = f"http://127.0.0.1:{closed_port()}"
    env = {**os.environ, "HF_ENDPOINT": unreachable, "HF_TOKEN": "hf_good", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train_sft.py"),
                             *command(tmp_path, "--push_to_hub", "--hub_model_id", "alice/tiny-sql")],
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"Cannot reach the Hub at {unreachable}" in result.stderr and "token itself was not checked" in result.stderr
    assert "No valid" not in result.stderr and "Traceback" not in result.stderr
    assert "Data:" not in result.stdout and not (tmp_path / "out").exists()


def test_preflight_tells_a_hub_that_hangs_up_from_one_that_refuses_the_token(online, hub):
    from starsql.train.hub import preflight

    hang_up = HangUp()
    try:
        online(hang_up.url)
        with pytest.raises(ConnectionError, match=f"Cannot reach the Hub at {hang_up.url}") as unreachable:
            preflight("alice/tiny-sql", token="hf_good")
        assert "valid" not in str(unreachable.value)
    finally:
        hang_up.close()
    online(hub.url)
    with pytest.raises(PermissionError, match=r"No valid Hugging Face token: the Hub at .* refused it \(401\)"):
        preflight("alice/tiny-sql", token="hf_revoked")
    assert preflight("alice/tiny-sql", token="hf_good") == "alice/tiny-sql"


def test_preflight_says_when_offline_mode_or_no_token_is_the_cause(monkeypatch, hub):
    from huggingface_hub import constants, hf_api

    from starsql.train.hub import preflight

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set"):
        preflight("alice/tiny-sql", token="hf_good")
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(hf_api, "get_token", lambda: None)
    with pytest.raises(PermissionError, match="No Hugging Face token: run `hf auth login`"):
        preflight("alice/tiny-sql", token=None)
    assert hub.requests == []
