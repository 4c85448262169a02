"""The served cache, one module a role:

- :mod:`~kvactors.cache.handle`: ``open`` and the ``KVCache`` handle;
- :mod:`~kvactors.cache.arguments`: what a caller may pass (keys, slot ids,
  tensors), checked before any message is sent;
- :mod:`~kvactors.cache.coordinator`: the actor sequencing each handshake,
  prepare -> transfers -> complete, and what a store or a load does next;
- :mod:`~kvactors.cache.executor`: running one plan: its transfers in order on
  the tier actors, then its completion, out of a cancellation's reach;
- :mod:`~kvactors.cache.policy_actor`: the actor answering for the tiers'
  metadata: its messages, what counts as an access, shared tiers, events;
- :mod:`~kvactors.cache.placement`: which block is in which tier of the chain
  (one manager per tier) and the plans of every handshake;
- :mod:`~kvactors.cache.tier_actor`: one actor per tier, running the transfers
  its medium does;
- :mod:`~kvactors.cache.messages`: every message, typed by its reply, and the plans;
- :mod:`~kvactors.cache.transfers`: a transfer (source, destination), and ``move``;
- :mod:`~kvactors.cache.results`: results and stats;
- :mod:`~kvactors.cache.events`: cache events and their fan-out;
- :mod:`~kvactors.cache.metrics`: Prometheus metrics of every tier.
"""
