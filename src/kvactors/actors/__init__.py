"""The actor runtime: ``Actor`` (bounded mailbox, ``ask`` / ``tell`` / ``try_tell``,
direct asks of an idle actor through ``handle_now``), ``Envelope`` (message +
one-shot reply), ``Future`` (the reply slot) and ``NOT_NOW``."""

from kvactors.actors._actor import NOT_NOW, Actor, ActorStats, Envelope
from kvactors.actors._future import Future

__all__ = ["NOT_NOW", "Actor", "ActorStats", "Envelope", "Future"]
