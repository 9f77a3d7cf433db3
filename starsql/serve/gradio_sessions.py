"""Gradio sessions that build their copy of the page's configuration a block at a time, as it is used.

Gradio starts a session (gradio.state_holder.SessionState) for every browser page, every gradio_client, and every
plain `POST /gradio_api/call/<api>` request, which has no session of its own to reuse. Each session at once builds
the configuration of every block of the app (`config_values`), and the state holder keeps it, for up to 10,000
sessions: for this app milliseconds of the one Python process that serves every user, and tens of kilobytes kept,
per request. An event then writes its inputs' and outputs' values into theirs; only Gradio's deep links read the
whole (`components`). `lazy_session_configs()` makes a session build a block's configuration when an event first
writes it, and the rest when `components` is read, from the same blocks.

app.py calls it unless LAZY_SESSIONS=0 (Gradio's own behaviour).
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


def _complete(session) -> dict:
    """The session's `config_values` with every block of the app in, those no event wrote built now. In place, so
    that a value an event writes meanwhile is not lost; blocks' order as Gradio's where none was written yet."""
    values = session.config_values
    app_blocks = session._app_blocks.blocks
    for key, block in list(session.blocks_config.blocks.items()):
        if key in app_blocks and key not in values:
            values.setdefault(key, session.blocks_config.config_for_block(key, [], block))
    return values


def lazy_session_configs() -> bool:
    """Make every Gradio session build its configuration as it is used (idempotent). Returns whether it was
    patched before this call."""
    if getattr(SessionState, _PATCHED, False):
        return True
    gradio_init, gradio_components = SessionState.__init__, SessionState.components

    @functools.wraps(gradio_init)
    def __init__(self, blocks):
        gradio_init(self, _AppWithoutBlocks(blocks))  # Gradio's own start, with an empty config_values
        self._app_blocks = blocks

    def components(self):
        if hasattr(self, "_app_blocks"):  # else made by Gradio's own __init__ (unpatched): built whole already
            _complete(self)
        return gradio_components.fget(self)

    # Events write config_values a key at a time: Gradio's _update_value_in_config builds a key that is missing.
    SessionState.__init__ = __init__
    SessionState.components = property(functools.wraps(gradio_components.fget)(components))
    setattr(SessionState, _PATCHED, True)
    return False
