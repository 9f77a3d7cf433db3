"""Serving: model -> decode -> check SQL -> UI (app.py).

`load` loads base + adapter for inference, `decode` streams SQL through a backend (plain `generate()` by
default), `check` compiles and runs the answer against the user's schema. `fast` is the dedicated-GPU
decoder, imported only when the app chooses it. `deploy` uploads the app as a Space.
"""
