"""`hf jobs uv run train_sft.py ...` ships only the files it is told about. Replay the README's
command through the real `hf` CLI with the Hub calls stubbed at the boundary, lay out the job's
filesystem from what would have been uploaded, and run the script there."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.cli.hf import app

from conftest import ROOT


def readme_jobs_command() -> list[str]:
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("hf jobs uv run ")]
    assert lines, "README.md must give the `hf jobs uv run` command"
    return shlex.split(lines[0])[1:]  # drop "hf"


def submit(monkeypatch, args, script_text=None) -> dict:
    """Run `hf jobs uv run ...` in-process; return what would reach the job."""
    sent = {"uploads": {}, "volumes": {}, "job": None}

    def sync_job_volume(self, source, mount_path, **kwargs):
        from huggingface_hub import Volume

        sent["volumes"][mount_path] = Path(source).resolve()
        return Volume(type="bucket", source="alice/jobs-artifacts", mount_path=mount_path, path="vol", read_only=True)

    def batch_bucket_files(self, bucket_id, add=(), **kwargs):
        for local, remote in add:
            sent["uploads"][remote.split("/", 1)[1]] = Path(local).resolve()

    def run_job(self, **kwargs):
        sent["job"] = kwargs
        raise SystemExit(0)  # stop here: nothing is submitted

    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "alice", "orgs": []})
    monkeypatch.setattr(HfApi, "create_bucket", lambda self, *a, **k: type("B", (), {"url": "hf://buckets/alice/x"})())
    monkeypatch.setattr(HfApi, "sync_job_volume", sync_job_volume)
    monkeypatch.setattr(HfApi, "batch_bucket_files", batch_bucket_files)
    monkeypatch.setattr(HfApi, "run_job", run_job)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        app.main(args=args, standalone_mode=False)
    assert sent["job"] is not None, "the CLI did not reach job submission"
    return sent


def lay_out_job(sent, root: Path) -> tuple[list[str], dict]:
    """The job container: uploads under /data, each local-folder volume at its mount path."""
    mounts = {"/data": root / "data"}
    (root / "data").mkdir(parents=True)
    for name, local in sent["uploads"].items():
        shutil.copy(local, root / "data" / name)
    for mount, source in sent["volumes"].items():
        mounts[mount] = root / mount.lstrip("/")
        shutil.copytree(source, mounts[mount], ignore=shutil.ignore_patterns("__pycache__"))

    def remap(value: str) -> str:  # the container's absolute paths live under `root` here
        return ":".join(str(root) + part if part.startswith("/") else part for part in value.split(":"))

    command = [remap(part) for part in sent["job"]["command"]]
    env = {key: remap(str(value)) for key, value in (sent["job"].get("env") or {}).items()}
    return command, env


def run_in_job(command, env, root):
    assert command[:2] == ["uv", "run"]
    script_and_args = [part for part in command[2:] if not part.startswith("--with")]
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
    return subprocess.run([sys.executable, *script_and_args, "--help"], cwd=root, env=clean_env,
                          capture_output=True, text=True, timeout=300)


def test_readme_command_ships_everything_train_sft_imports(monkeypatch, tmp_path):
    args = readme_jobs_command()
    sent = submit(monkeypatch, args)
    assert "train_sft.py" in sent["uploads"] and "starcoder2-3b-sql.yaml" in sent["uploads"]
    assert sent["job"]["flavor"] and "HF_TOKEN" in (sent["job"].get("secrets") or {})
    command, env = lay_out_job(sent, tmp_path / "job")
    result = run_in_job(command, env, tmp_path / "job")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "--lora_target_modules" in result.stdout and "--contamination_eval" in result.stdout


def test_without_the_package_volume_the_job_fails_with_a_clear_message(monkeypatch, tmp_path):
    # The control: the same command with the script's [tool.hf-jobs] volume removed.
    script = tmp_path / "train_sft.py"
    text = "\n".join(line for line in (ROOT / "train_sft.py").read_text().splitlines()
                     if not line.startswith(("# volumes = ", "# env = ")))
    script.write_text(text)
    args = [a if a != "train_sft.py" else str(script) for a in readme_jobs_command()]
    sent = submit(monkeypatch, args)
    command, env = lay_out_job(sent, tmp_path / "job")
    result = run_in_job(command, env, tmp_path / "job")
    assert result.returncode != 0 and "needs the `starsql` package" in result.stderr
