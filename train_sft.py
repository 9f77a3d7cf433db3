# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch>=2.6",
#     "transformers==5.23.0",
#     "trl==1.16.0",
#     "peft==0.21.2",
#     "bitsandbytes==0.50.2",
#     "datasets==5.2.0",
#     "accelerate==1.15.0",
#     "huggingface_hub==2.4.0",
#     "sqlglot==30.30.0",
#     "matplotlib>=3.8",
#     "pyyaml>=6",
#     "trackio==0.43.0",
# ]
#
# [tool.hf-jobs]
# flavor = "a10g-large"
# timeout = "2h"
# secrets = ["HF_TOKEN"]
# # The job receives only the files named on the command line; the package travels as a volume.
# volumes = ["./starsql:/opt/starsql/starsql"]
# env = { PYTHONPATH = "/opt/starsql" }
# ///
"""Fine-tune a code LLM (default: bigcode/starcoder2-3b) for text-to-SQL with QLoRA and TRL's SFTTrainer.

    python train_sft.py --config configs/starcoder2-3b-sql.yaml --output_dir starcoder2-3b-sql
    python train_sft.py --config configs/tiny.yaml --output_dir runs/tiny      # offline CPU smoke run
    hf jobs uv run train_sft.py --config configs/starcoder2-3b-sql.yaml \\
        --push_to_hub --hub_model_id USER/starcoder2-3b-sql                    # on Hugging Face's GPUs

Every flag of SFTConfig, TRL's ModelConfig and starsql.train.data.DataArguments works on the command line
and as a key in the YAML config; the command line wins. See `python train_sft.py --help`. The speed switches
(sync_free_step, fused_lora, compile_regions) each turn one fast path of starsql.train.speed off or on; with
all of them off the trainer is TRL's own SFTTrainer.
"""

import sys

try:
    from starsql.train.cli import main
except ModuleNotFoundError as error:
    if error.name != "starsql" and not str(error.name).startswith("starsql."):
        raise
    sys.exit(
        "train_sft.py needs the `starsql` package beside it. Run it from the repository root, or on HF Jobs "
        "mount it: hf jobs uv run -v ./starsql:/opt/starsql/starsql -e PYTHONPATH=/opt/starsql train_sft.py ..."
    )

if __name__ == "__main__":
    sys.exit(main())
