"""A replica slot: one replica position of the pool and the state of the actor that fills it."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.actor import ActorHandle


@dataclass(eq=False)
class Slot:
    """One replica position; its actor is replaced when it dies.

    Only the :class:`~flops_ray.farm.replica_pool.ReplicaPool` writes it; the others read it. A slot is known by
    its identity (``eq=False``), so the pool's bookkeeping can key on it.
    """

    handle: ActorHandle | None
    """The live actor; None while a replacement waits out its backoff."""
    ready: bool = False
    """The actor has answered a ``sync``: it is up, and later calls queue behind its next sync."""
    sync_ref: ray.ObjectRef | None = None
    """The actor's pending ``sync`` call (None: none pending)."""
    sync_gen: int = 0
    """Which of the pool's syncs ``sync_ref`` answers (a replica still starting may answer an old one)."""
    start_at: float = 0.0
    """``time.monotonic()`` at which a waiting replacement starts."""
    losses: int = 0
    """Replicas of this slot lost in a row without one answering a sync (sets the slot's backoff)."""
    version: int = 0
    """Updates applied to the parameters its actor holds (a new actor starts from the model: 0)."""
