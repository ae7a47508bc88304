"""Per-call costs of this Ray and this machine: the units of the farm's step-time model."""

from __future__ import annotations

import time

import numpy as np
import ray


@ray.remote(num_cpus=0)
class _Echo:
    def ping(self) -> None:
        return None


def _best(reps: int, fn) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def call_costs(reps: int = 3, fanout: int = 8) -> dict[str, float]:
    """Seconds per pipelined actor call, per actor of one call to each of ``fanout`` actors (the batch, the
    collective and the update a step sends every replica), per MiB of ``ray.put``, and per MiB of a driver-side
    float64 sum."""
    echo = _Echo.remote()
    ray.get(echo.ping.remote())
    n = 500
    call = _best(reps, lambda: ray.get([echo.ping.remote() for _ in range(n)])) / n
    ray.kill(echo)
    echoes = [_Echo.remote() for _ in range(fanout)]
    ray.get([e.ping.remote() for e in echoes])
    spread = _best(reps * 10, lambda: ray.get([e.ping.remote() for e in echoes])) / fanout
    for e in echoes:
        ray.kill(e)
    mib = 64
    arr = np.ones(mib * 2**20 // 4, dtype=np.float32)
    put = _best(reps, lambda: ray.put(arr)) / mib
    acc = np.zeros(mib * 2**20 // 8)
    part = np.ones_like(acc)
    add = _best(reps, lambda: np.add(acc, part, out=acc)) / mib
    return {"call_seconds": call, "fanout_seconds": spread, "put_seconds_per_mib": put, "reduce_seconds_per_mib": add}
