"""Pushing to the Hub: a check before training, the upload after a successful run."""

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

# What a user of the adapter needs; checkpoints and optimizer states stay local.
PUSH_PATTERNS = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "README.md",
    "*.png",
    "eval_results.json",
]


def preflight(repo_id: str | None, private: bool = False, token: str | None = None) -> str:
    """Check the token and write access to `repo_id` before any GPU time is spent; returns the repo id."""
    if not repo_id or "/" not in repo_id:
        raise ValueError(f"--hub_model_id must be USER/NAME or ORG/NAME, got {repo_id!r}.")
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except Exception as error:  # no token, or a revoked one
        raise PermissionError(
            "No valid Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token), "
            f"then start again. ({error})"
        ) from error
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except HfHubHTTPError as error:
        orgs = [org["name"] for org in user.get("orgs", [])]
        raise PermissionError(
            f"Cannot create or write {repo_id} as {user.get('name')} (orgs: {orgs}). "
            f"Check the namespace and that the token has write access. ({error})"
        ) from error
    return url.repo_id


def push_folder(output_dir: str | Path, repo_id: str, token: str | None = None, message: str = "Upload adapter"):
    """Upload the adapter, tokenizer, card and pictures in one commit."""
    return HfApi(token=token).upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        allow_patterns=PUSH_PATTERNS,
        commit_message=message,
    )
