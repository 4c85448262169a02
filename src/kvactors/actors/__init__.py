"""The actor runtime: ``Actor`` (bounded mailbox, ``ask`` / ``tell`` / ``try_tell``),
``Envelope`` (message + one-shot reply) and ``Future`` (the reply slot)."""

from kvactors.actors._actor import Actor, ActorStats, Envelope
from kvactors.actors._future import Future

__all__ = ["Actor", "ActorStats", "Envelope", "Future"]
