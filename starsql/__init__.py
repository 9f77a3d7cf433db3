"""starsql: fine-tune a code LLM into a text-to-SQL assistant and serve it.

Three flows around one prompt template (`prompt`):
- `train`: data -> prompt -> train -> card/push (`train_sft.py` runs it);
- `serve`: model -> decode -> check SQL -> UI (`app.py` runs it);
- `evaluate`: Spider -> score -> report (`python -m starsql.evaluate`).
`schema`, `sandbox` and `tiny` are shared by them.
"""

__version__ = "0.1.0"
