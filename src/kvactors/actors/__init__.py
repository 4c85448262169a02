"""The actor runtime: ``Actor`` (bounded mailbox; ``ask`` / ``tell`` / ``try_tell``),
``Message`` (the base of every message, typed by its reply), ``Envelope`` (a
message in a mailbox, with its reply slot), ``Future`` (the reply slot) and
``Threads`` (an actor's own worker threads)."""

from kvactors.actors._actor import Actor, ActorStats, Envelope, Message
from kvactors.actors._future import Future
from kvactors.actors._threads import Threads

__all__ = ["Actor", "ActorStats", "Envelope", "Future", "Message", "Threads"]
