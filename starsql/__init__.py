"""starsql: fine-tune a code LLM into a text-to-SQL assistant and serve it.

The data flows data -> prompt -> train -> card/push (`data`, `prompt`, `modeling`, `train`,
`card`, `hub`), and model -> generate -> validate SQL -> UI (`generate`, `sqlcheck`, `app.py`).
"""

__version__ = "0.1.0"
