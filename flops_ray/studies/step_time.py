"""A step-time model of the farm: how long one step takes on ``n`` replicas, from per-unit costs.

A step is a sequence of rounds (clean pass, pilot, main) separated by barriers. A round of ``T`` equal
shards on ``n`` replicas takes ``ceil(T / n)`` waves of one shard each (completion-order dispatch of equal
shards), and never less than the driver needs to dispatch its calls. Then the update: the LR partials
meet in the exact all-reduce among the replicas (each member sends its tasks' float32 partials, range by range,
to the ranges' owners in an all-to-all, and receives the owners' float64 sums in an all-gather:
``(n-1)/n x (4 P_g ceil(T_g / n) + 8 P_g)`` bytes per group per replica, ``2 (n-1)`` link latencies per group);
SPSA/ES send per-draw coefficients and the replicas rebuild the gradient from seeds (``draws x P_g`` noise
numbers): ``scalar``, each replica all of them whatever ``n``; ``sliced``, each ``1/n`` of them and one all-gather
of the float64 sums (``(n-1)/n x 8P`` bytes). Each replica applies the optimizer to its own copy.
The driver adds its fixed per-step work (planning, allocation), and calls every replica a few times per step
(the step's batch, the collective, the update: ``fanout``, growing with ``n``). The allocator's fit runs in a thread from
the main round until the next step's allocation, a whole step less the driver's own work, so a step lasts
at least the fit plus that work. Parameters never cross the driver. On a
machine whose cores the replicas share with the driver, a step also takes at least all of their CPU
seconds divided by the cores.

>>> w = Workload(rounds=((64, 64), (1024, 64)), params=1000, reduction="allreduce", groups=((1000, 16),))
>>> c = Costs(query_s=1e-3, call_s=1e-4, driver_s=0.01, link_bytes_per_s=1e9)
>>> round(step_time(w, c, 1)["total"], 4), round(step_time(w, c, 4)["total"], 4)
(1.0984, 0.3305)
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """One step's work."""

    rounds: tuple[tuple[int, int], ...]
    """Per round (barrier to barrier): ``(forwards, shard_cost)``; clean items count as forwards."""
    params: int
    """``P``: trainable parameters (all groups)."""
    reduction: str
    """``allreduce`` (LR partials), ``scalar`` (SPSA/ES coefficients, every replica rebuilds the whole gradient
    from seeds) or ``sliced`` (each replica rebuilds ``1/n`` of it, then an all-gather)."""
    groups: tuple[tuple[int, int], ...] = ()
    """``allreduce``: per layer group, ``(P_g, T_g)``: its parameters and its main tasks per step."""
    replay_numbers: int = 0
    """``scalar``, ``sliced``: noise numbers the replicas regenerate to rebuild the gradient, ``sum_g draws_g x
    P_g``."""
    update_bytes: int = 0
    """``scalar``: bytes of the step's coefficient message, which the driver sends to every replica."""


@dataclass(frozen=True)
class Costs:
    """Per-unit costs of one replica and of the driver (measured, or stated for a device not at hand)."""

    query_s: float
    """Seconds per perturbed forward on one replica (1 / engine queries per second)."""
    call_s: float
    """Driver seconds per dispatched call (a pipelined actor call)."""
    driver_s: float
    """Driver seconds per step outside the replicas' work: planning, allocation, bookkeeping."""
    link_bytes_per_s: float
    """Bandwidth of each replica's link in the all-reduce ring."""
    task_s: float = 0.0
    """Seconds a shard call costs beyond its forwards (Ray's task overhead at both ends, the result's trip)."""
    link_latency_s: float = 20e-6
    """Latency of one hop of the ring."""
    apply_s_per_param: float = 0.0
    """Optimizer step per parameter on a replica."""
    replay_s_per_number: float = 0.0
    """``scalar``: seconds per regenerated and weighed noise number on a replica."""
    driver_bytes_per_s: float = 1e9
    """Bandwidth out of the driver (the coefficient message goes to every replica)."""
    cores: float = math.inf
    """Cores the replicas share (a local run): ``n`` replicas above it each run ``cores / n`` as fast."""
    host_s: float = 0.0
    """CPU seconds per step that the driver and Ray's own processes take from those cores (a local run)."""
    fanout_s: float = 0.0
    """Driver seconds per replica of a call it makes to every replica (one call to each of many actors)."""
    fit_s: float = 0.0
    """Driver seconds per step in a thread beside the rest (the allocator fit, from the main round to the next
    step's allocation): a step lasts at least ``fit_s + driver_s``."""


def round_time(forwards: int, shard_cost: int, n: int, costs: Costs) -> float:
    """Seconds for a round of ``forwards`` in shards of ``shard_cost`` on ``n`` replicas."""
    if forwards == 0:
        return 0.0
    shards = math.ceil(forwards / shard_cost)
    slow = max(1.0, n / costs.cores)
    shard_s = forwards / shards * costs.query_s * slow + costs.task_s
    waves = math.ceil(shards / n)
    return max(waves * shard_s, shards * costs.call_s) + costs.call_s


def step_time(work: Workload, costs: Costs, n: int) -> dict[str, float]:
    """Seconds of one step on ``n`` replicas, by part (``total`` is their sum)."""
    compute = sum(round_time(f, s, n, costs) for f, s in work.rounds)
    # Shared cores: the replicas' and the host's CPU seconds cannot take less than the cores can serve.
    shards = sum(math.ceil(f / s) for f, s in work.rounds if f)
    busy = sum(f for f, _ in work.rounds) * costs.query_s + shards * costs.task_s + costs.host_s
    compute = max(compute, busy / costs.cores)
    share = (n - 1) / n
    if work.reduction == "allreduce":
        sent = sum(4 * p * math.ceil(t / n) + 8 * p for p, t in work.groups) * share
        hops = 2 * (n - 1) * len(work.groups) * costs.link_latency_s
        reduce = sent / costs.link_bytes_per_s + hops + 2 * costs.call_s
    else:
        send = n * work.update_bytes / costs.driver_bytes_per_s
        sliced = work.reduction == "sliced" and n > 1
        numbers = work.replay_numbers / n if sliced else work.replay_numbers
        replay = numbers * costs.replay_s_per_number * max(1.0, n / costs.cores)
        gather = 8 * work.params * share / costs.link_bytes_per_s + (n - 1) * costs.link_latency_s if sliced else 0.0
        reduce = send + replay + gather + costs.call_s
    # One call per replica per step for the batch and one for the update, one more for a collective.
    calls = 2 + (work.reduction in ("allreduce", "sliced"))
    parts = {
        "driver": costs.driver_s,
        "fanout": n * calls * costs.fanout_s,
        "compute": compute,
        "reduce": reduce,
        "apply": work.params * costs.apply_s_per_param,
    }
    # The fit's window is the step less the driver's own work; what the fit outlasts it by, the step waits.
    parts["fit_wait"] = max(0.0, costs.fit_s + costs.driver_s - sum(parts.values()))
    parts["total"] = sum(parts.values())
    return parts


def efficiency(work: Workload, costs: Costs, n: int) -> float:
    """Strong-scaling efficiency ``T(1) / (n T(n))`` of the same step on ``n`` replicas."""
    return step_time(work, costs, 1)["total"] / (n * step_time(work, costs, n)["total"])
