"""The served cache, one module a role:

- :mod:`~kvactors.cache.handle`: ``open`` and the ``KVCache`` handle (argument checks);
- :mod:`~kvactors.cache.coordinator`: the actor running each handshake,
  prepare -> transfers -> complete;
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
