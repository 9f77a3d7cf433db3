"""Gradio sessions that build their copy of the page's configuration only when something reads it.

Gradio starts a session (gradio.state_holder.SessionState) for every browser page, every gradio_client, and every
plain `POST /gradio_api/call/<api>` request, which has no session of its own to reuse. Each session at once builds
the configuration of every block of the app (`config_values`, what a deep link saves), and the state holder keeps
it: for this app milliseconds of the one Python process that serves every user, and tens of kilobytes kept per
request, for up to 10,000 sessions. Only Gradio's deep links read it. `lazy_session_configs()` makes a session
build it on first read instead, from the same blocks, so that a plain API call neither pays for it nor keeps it.

app.py calls it unless GRADIO_LAZY_SESSIONS=0 (Gradio's own behaviour).
"""

import functools

from gradio.state_holder import SessionState

_PATCHED = "_starsql_lazy_configs"


class _AppWithoutBlocks:
    """The app as SessionState.__init__ sees it here: no blocks to build configurations for now, the rest as is."""

    def __init__(self, blocks):
        self._blocks = blocks
        self.blocks = {}

    def __getattr__(self, name):
        return getattr(self._blocks, name)


def _config_values(session) -> dict:
    """The session's `config_values`, built on first read the way Gradio builds them when a session starts."""
    values = session.__dict__.get("_config_values")
    if values is None:
        app_blocks = session.__dict__["_app_blocks"].blocks
        values = {key: session.blocks_config.config_for_block(key, [], block)
                  for key, block in session.blocks_config.blocks.items() if key in app_blocks}  # fmt: skip
        session.__dict__["_config_values"] = values
    return values


def _set_config_values(session, values: dict):
    session.__dict__["_config_values"] = values


def lazy_session_configs() -> bool:
    """Make every Gradio session build its `config_values` when first read (idempotent). Returns whether it was
    patched before this call."""
    if getattr(SessionState, _PATCHED, False):
        return True
    gradio_init = SessionState.__init__

    @functools.wraps(gradio_init)
    def __init__(self, blocks):
        gradio_init(self, _AppWithoutBlocks(blocks))  # Gradio's own start, with nothing to build yet
        self.__dict__.pop("_config_values", None)  # the empty one it built: read, it builds the real one
        self.__dict__["_app_blocks"] = blocks

    SessionState.__init__ = __init__
    SessionState.config_values = property(_config_values, _set_config_values)
    setattr(SessionState, _PATCHED, True)
    return False
