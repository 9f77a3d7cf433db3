"""Pushing to the Hub: a check before training, the upload after a successful run."""

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

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
    """Check the token and write access to `repo_id` before any GPU time is spent; returns the repo id.

    Three failures read differently, each with its fix: no token at all, a Hub that cannot be reached (network,
    proxy, HF_ENDPOINT, HF_HUB_OFFLINE) and a token the Hub refuses (401/403)."""
    if not repo_id or "/" not in repo_id:
        raise ValueError(f"--hub_model_id must be USER/NAME or ORG/NAME, got {repo_id!r}.")
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except LocalTokenNotFoundError as error:
        raise PermissionError(
            "No Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token), then start again."
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise PermissionError(
                f"No valid Hugging Face token: the Hub at {api.endpoint} refused it ({status}). Run `hf auth login` "
                "or set HF_TOKEN to a write token, then start again."
            ) from error
        raise ConnectionError(
            f"The Hub at {api.endpoint} answered {status} to the token check; try again later. ({error})"
        ) from error
    except OfflineModeIsEnabled as error:
        raise ConnectionError(
            "HF_HUB_OFFLINE is set, so the token and the repo cannot be checked: unset it to push, or drop --push_to_hub."
        ) from error
    except Exception as error:  # connection refused or reset, DNS, proxy, time-out: the token was never checked
        raise ConnectionError(
            f"Cannot reach the Hub at {api.endpoint} to check the token ({type(error).__name__}: {error}). Check the "
            "network, a proxy or HF_ENDPOINT, then start again; the token itself was not checked."
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
