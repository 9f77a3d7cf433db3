"""The command line of `train_sft.py`: parse the four argument dataclasses (flags and a YAML `--config`), run.

A mistake in the command line or config is reported in one line that says what to fix, with exit code 2;
STARSQL_DEBUG=1 shows the full traceback instead. The token given with `--hub_token` is taken out of sys.argv
once parsed, so nothing that records the command line (trackers, the unfinished run's note) can write it.
"""

import logging
import os
import sys
import warnings

import yaml

DEBUG_ENV = "STARSQL_DEBUG"
EXIT_CONFIG_ERROR = 2  # what argparse exits with for a bad flag


def quiet_known_warnings() -> None:
    """Silence the messages every CPU run printed that are known to be harmless and that this project cannot fix
    at their source (their causes that it could fix are fixed: TrainingConfig pins memory only with an accelerator
    and names activation checkpointing by its new name)."""
    # PEFT 0.21 and TRL 1.16 read the model's `is_gradient_checkpointing`, which transformers 5 deprecated.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # bitsandbytes' CPU backend tries to fetch an optional faster 4-bit kernel from the Hub (`kernels` package) and
    # warns when it cannot; it then uses its own CPU kernel, the one the tests and the tiny recipe run.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def report(error: BaseException) -> int:
    message = " ".join(str(error).split()) if "\n" not in str(error).strip() else str(error).strip()
    print(f"error: {message or type(error).__name__}  ({DEBUG_ENV}=1 shows the traceback)", file=sys.stderr, flush=True)
    return EXIT_CONFIG_ERROR


def scrub_argv(token: str | None) -> None:
    """Put a placeholder where sys.argv held the token (`--hub_token T` or `--hub_token=T`)."""
    if token:
        sys.argv[:] = [arg.replace(token, "<HUB_TOKEN>") for arg in sys.argv]


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()
    from trl import TrlParser

    from .data import DataArguments
    from .model import ModelArguments
    from .sft import ConfigError, RunArguments, TrainingConfig, run

    debug = debugging()
    try:
        parser = TrlParser((RunArguments, TrainingConfig, ModelArguments, DataArguments))
        run_args, training_args, model_args, data_args = parser.parse_args_and_config(argv)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as error:
        if debug:
            raise
        return report(error)
    scrub_argv(training_args.hub_token)
    try:
        return run(run_args, training_args, model_args, data_args)
    except ConfigError as error:
        if debug:
            raise
        return report(error)
