"""The actor runtime: ``Actor`` (bounded mailbox; ``ask`` / ``tell`` / ``try_tell``),
``Message`` (the base of every message, typed by its reply), ``Envelope`` (a
message in a mailbox, with its reply slot) and ``Future`` (the reply slot)."""

from kvactors.actors._actor import Actor, ActorStats, Envelope, Message
from kvactors.actors._future import Future

__all__ = ["Actor", "ActorStats", "Envelope", "Future", "Message"]
