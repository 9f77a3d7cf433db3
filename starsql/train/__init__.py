"""Training: data -> prompt -> SFTTrainer -> adapter, card, push.

`data` reads datasets into prompt/completion rows, `model` loads the (4-bit) base, `sft` is the run that
`train_sft.py` calls, `card` and `hub` write the model card and push. `speed` and `fused_lora` hold the
optional fast paths, each behind a TrainingConfig switch.
"""
