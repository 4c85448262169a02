"""The actor runtime: ``Actor`` (bounded mailbox; ``ask`` / ``tell`` / ``try_tell``),
``Message`` (the base of every message, typed by its reply), ``Envelope`` (a
message in a mailbox, with its reply slot), ``Future`` (the reply slot),
``Threads`` (an actor's own worker threads) and ``loop_checkpoints`` (the
running backend's checkpoints, looked up once)."""

from kvactors.actors._actor import (
    Actor,
    ActorStats,
    Checkpoint,
    Envelope,
    Message,
    loop_checkpoints,
)
from kvactors.actors._future import Future
from kvactors.actors._threads import Threads

__all__ = [
    "Actor",
    "ActorStats",
    "Checkpoint",
    "Envelope",
    "Future",
    "Message",
    "Threads",
    "loop_checkpoints",
]
