"""The asyncio background-task helper every server's shutdown shares.

``cancel_and_wait``: cancel a background task (a watch loop, a batcher, a backend start) and wait
until it has ended, so a closed server leaves nothing running; its outcome is not the caller's.
"""
from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` (None, or already done: nothing to cancel) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    # Its outcome (cancelled, or an error already reported) is not this caller's.
    await asyncio.gather(task, return_exceptions=True)
