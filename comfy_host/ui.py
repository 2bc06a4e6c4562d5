"""Messages to the browser and the node's progress bar, through ComfyUI's server."""

from __future__ import annotations

import logging

import comfy.utils

log = logging.getLogger("ComfyUI-DTI")


def progress_bar(total: int, node_id=None):
    """The host's ``ProgressBar`` for this node (it also raises on cancel when updated)."""
    return comfy.utils.ProgressBar(int(total), node_id=node_id)


# In-process listeners ``fn(event, data)`` of everything send_to_client sends (the command line's
# terminal progress bar uses them; a browser gets the same events through the server).
LISTENERS: list = []


def send_to_client(event: str, data: dict) -> None:
    """Push a message to the browser tab that queued the prompt; silent when no server runs."""
    for listener in list(LISTENERS):
        try:
            listener(event, data)
        except Exception as e:  # a progress display must never fail a training run
            log.debug("DTI: listener failed on %s: %s", event, e)
    try:
        from server import PromptServer
    except Exception:  # no server: tests, scripts
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return
    try:
        instance.send_sync(event, data, instance.client_id)
    except Exception as e:  # a UI message must never fail a training run
        log.debug("DTI: could not send %s: %s", event, e)
