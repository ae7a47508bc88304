"""Where queries run: the ``farm:`` section of a config."""

from __future__ import annotations

from dataclasses import dataclass

from flops_ray.config.validation import require

REDUCTIONS = ("auto", "scalar", "allreduce", "driver")
REPLAYS = ("auto", "full", "sliced")
RENAMED = {
    "farm.workers": "farm.replicas",
    "farm.num_cpus_per_worker": "farm.num_cpus_per_replica",
    "farm.num_gpus_per_worker": "farm.num_gpus_per_replica",
}
"""Old config keys -> their names now: still read, with a warning (the thing that runs queries is a replica)."""


@dataclass(frozen=True)
class FarmConfig:
    """Where queries run: in this process, or on a Ray farm of replica actors."""

    backend: str = "local"
    """``local`` (one in-process replica) or ``ray`` (driver + replica actors)."""
    local_threads: int = 0
    """Local: torch intra-op threads of the in-process step; 0: a replica's count (one per
    ``num_cpus_per_replica``), so a local run and a farm run give the same parameters bit for bit. More threads
    run faster on a many-core machine, but a CPU's float32 products round by their thread count, so the
    parameters then differ from the farm's in the last bits (docs/FARM.md, determinism)."""
    replicas: int | str = 2
    """Ray: number of replica actors, or an elastic range ``"min..max"``: the run starts once ``min`` are up
    (more if the cluster holds them), replicas join as the autoscaler adds nodes (adopting a live peer's
    parameters) up to ``max``, and leave with their nodes without failing the run."""
    num_cpus_per_replica: float = 1.0
    """Ray: CPUs reserved per replica actor."""
    num_gpus_per_replica: float = 0.0
    """Ray: GPUs per replica actor (fractions pack several replicas on one GPU)."""
    replica_resource: str = ""
    """Ray: name of a custom node resource each replica takes one unit of, capping replicas per node."""
    address: str = ""
    """Ray: address of an existing cluster (``auto``, ``host:port``, ``ray://...``); empty starts a local Ray
    on loopback (or joins ``RAY_ADDRESS``, as set by ``ray job submit``)."""
    connect_timeout_s: float = 30.0
    """Ray: seconds to wait for ``address`` to answer before failing (Ray itself would retry forever)."""
    shard_cost: int = 64
    """Target forward passes per shard (one remote call): large enough that its work amortises the call's cost."""
    clean_shard: int = 0
    """Samples per clean-pass task (one plain forward each); 0: ``shard_cost``. The clean pass is a barrier
    before the allocation: on a farm with more replicas than ``batch_size / shard_cost`` clean tasks, smaller
    ones spread it over more replicas (the results depend on it, never on the number of replicas)."""
    in_flight: int = 2
    """Ray: calls in flight per replica; completion-order dispatch keeps fast replicas busy."""
    reduction: str = "auto"
    """How the step's gradient reaches every replica's copy of the parameters: ``scalar`` (SPSA/ES: each shard
    returns one coefficient per noise draw and every replica rebuilds the gradient from seeds; bytes grow with
    queries, not with ``P``), ``allreduce`` (partials meet in one torch.distributed collective among the
    replicas), ``driver`` (partials summed on the driver in canonical order and sent back: bit-identical for
    any number of replicas, ``O(P)`` bytes per shard); ``auto``: ``scalar`` for SPSA/ES, else ``allreduce``."""
    replay: str = "auto"
    """Ray, ``scalar``: how replicas rebuild the step's SPSA/ES gradient from its coefficients: ``full`` (each
    rebuilds all of it: every replica pays the whole step's noise), ``sliced`` (each rebuilds a share of the
    canonical slices and one all-gather assembles them, the same bits), ``auto``: ``sliced`` with two or more
    replicas once the trained parameters span four slices (2^20), else ``full`` (a small model's replay costs
    less than the collective)."""
    max_retries: int = 30
    """Ray: replica deaths in a row the farm survives with no shard result in between (more fail it).
    Results refill the budget, so a storm of preemptions is survived while work still gets done, even 20
    deaths in a row (each replica killed at its first shard); a replica lost while still starting is not
    counted; a slot's replacements in a row back off (0.5 s doubling, at most 10 s). A sample that kills
    every replica is found long before (``poison_deaths``)."""
    poison_deaths: int = 3
    """Ray: a task whose replicas die this many times in a row while it runs alone on them has its samples
    probed, one call per sample, each alone; a probe that kills two replicas that had finished a shard before
    (each alive as the probe started) names its sample, and the run fails naming its dataset index
    (docs/FARM.md, faults)."""
    skip_poison: bool = False
    """Ray: instead of failing, leave such a sample out: its step runs again without it, and so does every
    later batch holding it (counted as ``skipped_samples`` in the farm's counters, listed per step in the
    report). The result is still a function of the config and the data."""
    stall_timeout_s: float = 600.0
    """Ray: seconds without any shard result before the step fails (a hung replica or a full cluster),
    and the longest wait for the first replica to be placed (an autoscaler may be adding a node)."""
    snapshot_every: int = 1
    """Ray: every this many steps one replica (in turn) copies its parameters and optimizer state into its
    node's object store, so a run survives losing every replica process at once, though not the snapshot's
    node (a replacement adopts a live peer's state first, else this snapshot if it holds the current
    parameters: with ``k > 1`` only one step in ``k`` is covered; the driver holds only a reference).
    0: no periodic snapshot (reading the state for a checkpoint still leaves one)."""
    collective_timeout_s: float = 60.0
    """Ray, ``allreduce``: seconds a replica waits in the collective for a peer that may have died."""

    @property
    def elastic(self) -> bool:
        """Whether ``replicas`` is a range ``"min..max"``."""
        return isinstance(self.replicas, str)

    @property
    def min_replicas(self) -> int:
        """Replicas the farm waits for before step 0."""
        return replica_range(self.replicas)[0]

    @property
    def max_replicas(self) -> int:
        """Replica slots the farm keeps (those not placed wait for resources)."""
        return replica_range(self.replicas)[1]

    @property
    def clean_shard_size(self) -> int:
        """Samples per clean-pass task (``clean_shard``, else ``shard_cost``)."""
        return self.clean_shard or self.shard_cost

    def validate(self) -> None:
        require(self.backend in ("local", "ray"), "farm.backend", f"must be 'local' or 'ray', got {self.backend!r}")
        require(
            self.local_threads >= 0,
            "farm.local_threads",
            f"must be >= 0 (0: a replica's count), got {self.local_threads}",
        )
        replica_range(self.replicas)
        require(self.num_cpus_per_replica >= 0, "farm.num_cpus_per_replica", "must be >= 0")
        require(self.num_gpus_per_replica >= 0, "farm.num_gpus_per_replica", "must be >= 0")
        require(self.shard_cost >= 2, "farm.shard_cost", f"must be >= 2, got {self.shard_cost}")
        require(self.clean_shard >= 0, "farm.clean_shard", f"must be >= 0 (0: shard_cost), got {self.clean_shard}")
        require(self.in_flight >= 1, "farm.in_flight", f"must be >= 1, got {self.in_flight}")
        require(self.reduction in REDUCTIONS, "farm.reduction", f"must be one of {REDUCTIONS}")
        require(self.replay in REPLAYS, "farm.replay", f"must be one of {REPLAYS}, got {self.replay!r}")
        require(self.max_retries >= 0, "farm.max_retries", "must be >= 0")
        require(self.poison_deaths >= 1, "farm.poison_deaths", f"must be >= 1, got {self.poison_deaths}")
        require(self.snapshot_every >= 0, "farm.snapshot_every", f"must be >= 0, got {self.snapshot_every}")
        require(self.connect_timeout_s > 0, "farm.connect_timeout_s", f"must be > 0, got {self.connect_timeout_s}")
        require(self.stall_timeout_s > 0, "farm.stall_timeout_s", f"must be > 0, got {self.stall_timeout_s}")
        require(
            self.collective_timeout_s > 0,
            "farm.collective_timeout_s",
            f"must be > 0, got {self.collective_timeout_s}",
        )


def replica_range(replicas: int | str) -> tuple[int, int]:
    """``(min, max)`` replicas of ``farm.replicas``: a number ``n`` is ``(n, n)``, a string ``"a..b"`` is ``(a, b)``.

    >>> replica_range(3), replica_range("2..8")
    ((3, 3), (2, 8))

    Raises:
        ConfigError: not a positive number or a range ``1 <= min <= max``.
    """
    if isinstance(replicas, int) and not isinstance(replicas, bool):
        low = high = replicas
    else:
        parts = str(replicas).split("..")
        ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
        require(ok, "farm.replicas", f"must be a number or a range 'min..max', got {replicas!r}")
        low, high = (int(p) for p in parts)
    require(1 <= low <= high, "farm.replicas", f"must be >= 1 (and min <= max), got {replicas!r}")
    return low, high
