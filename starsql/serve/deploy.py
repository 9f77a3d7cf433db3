"""Deploy the app as a Hugging Face Space, in one command.

    python -m starsql.serve.deploy --space_id USER/starsql --adapter USER/starcoder2-3b-sql
    python -m starsql.serve.deploy --space_id USER/starsql --adapter USER/starcoder2-3b-sql --hardware zero-a10g
    python -m starsql.serve.deploy --space_id USER/starsql --adapter USER/starcoder2-3b-sql --dry_run

Creates the Space (Gradio SDK), sets the ADAPTER and BASE_MODEL variables the app reads, and
uploads exactly what the app needs: app.py, the starsql modules it imports (found by reading
the imports, so the list follows the code), the Space card and the Space's requirements.
"""

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "starsql"
SPACE_DIR = ROOT / "space"
ADAPTER_PLACEHOLDER = "USER/starcoder2-3b-sql"  # the adapter id in space/README.md's `models:`


def _imported_modules(path: Path) -> set[str]:
    """starsql modules that the file at `path` imports, at the top or inside functions."""
    relative = path.resolve().relative_to(ROOT).with_suffix("")
    # The package a relative import starts from: starsql/serve/decode.py -> starsql.serve
    package = list(relative.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y, from ..x import y (inside the package)
                base = ".".join(filter(None, [*package[: len(package) - node.level + 1], node.module]))
            else:
                base = node.module or ""
            if base.split(".")[0] == PACKAGE:
                found.add(base)
                # `from starsql.serve import check` (or `from . import fast`) imports a module or a package
                folder = ROOT / base.replace(".", "/")
                found |= {f"{base}.{alias.name}" for alias in node.names
                          if (folder / f"{alias.name}.py").is_file() or (folder / alias.name / "__init__.py").is_file()}
    return found


def _module_file(module: str) -> Path:
    path = ROOT / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def space_files(entry: str = "app.py") -> list[str]:
    """Repository paths the app needs at run time: `entry` and every starsql module it imports,
    transitively, with the package's __init__.py."""
    files = {entry}
    todo = [ROOT / entry]
    while todo:
        for module in _imported_modules(todo.pop()):
            parts = module.split(".")
            for depth in range(1, len(parts) + 1):  # importing starsql.x runs starsql/__init__.py first
                path = _module_file(".".join(parts[:depth]))
                relative = path.relative_to(ROOT).as_posix()
                if path.is_file() and relative not in files:
                    files.add(relative)
                    todo.append(path)
    return sorted(files)


def upload_plan(adapter: str) -> list[tuple[str, bytes]]:
    """(path in the Space, content) for every file of the Space."""
    plan = [(path, (ROOT / path).read_bytes()) for path in space_files()]
    card = (SPACE_DIR / "README.md").read_text().replace(ADAPTER_PLACEHOLDER, adapter)
    plan.append(("README.md", card.encode()))
    plan.append(("requirements.txt", (SPACE_DIR / "requirements.txt").read_bytes()))
    return plan


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Create or update the StarSQL Space.")
    parser.add_argument("--space_id", required=True, help="USER/NAME or ORG/NAME of the Space.")
    parser.add_argument("--adapter", required=True, help="Hub id of the LoRA adapter the Space serves.")
    parser.add_argument("--base_model", default="bigcode/starcoder2-3b", help="Hub id of the base model.")
    parser.add_argument("--private", action="store_true", help="Create the Space private.")
    parser.add_argument("--hardware", default=None,
                        help="Request hardware, e.g. zero-a10g (ZeroGPU), t4-small, a10g-small; default: the free CPU.")
    parser.add_argument("--token", default=None, help="Hugging Face write token (default: the logged-in one).")
    parser.add_argument("--dry_run", action="store_true", help="Print the files that would be uploaded and stop.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = upload_plan(args.adapter)
    for path, content in plan:
        print(f"{path}  ({len(content):,} bytes)")
    if args.dry_run:
        return 0

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=args.token)
    repo = api.create_repo(args.space_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
    # Variables first, so the build that the upload starts already serves the adapter.
    api.add_space_variable(repo.repo_id, "ADAPTER", args.adapter, description="LoRA adapter the app serves")
    api.add_space_variable(repo.repo_id, "BASE_MODEL", args.base_model, description="Base model of the adapter")
    # Files an earlier deploy uploaded that the app no longer needs are removed: the Space holds the plan, exactly.
    stale = set(api.list_repo_files(repo.repo_id, repo_type="space")) - {path for path, _ in plan} - {".gitattributes"}
    api.create_commit(
        repo.repo_id,
        repo_type="space",
        operations=[CommitOperationAdd(path_in_repo=path, path_or_fileobj=content) for path, content in plan]
        + [CommitOperationDelete(path_in_repo=path) for path in sorted(stale)],
        commit_message=f"Deploy StarSQL app serving {args.adapter}",
    )
    if args.hardware:
        api.request_space_hardware(repo.repo_id, args.hardware)
    print(f"Space: https://huggingface.co/spaces/{repo.repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
