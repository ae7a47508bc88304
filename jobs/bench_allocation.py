"""Allocation benchmark: does each allocator reduce the gradient's error, along a default training run?

At checkpoints of a training run of the default config (start, middle, end), on that step's batch and
parameters, every allocator estimates the batch gradient ``reps`` times with fresh noise (the same noise
for every allocator: paired repetitions) at the same total budget. Reported per checkpoint:

- ``mse_ratio[A]``: mean ``|g_hat - g|^2`` against the exact backprop gradient of the batch, divided by
  equal allocation's; below 1 means the allocation pays.
- ``oracle``: Neyman allocation from traces measured with a separate large pilot, not charged to the
  budget: the best any allocator could do from exact traces.
- ``joint_oracle``: Neyman over (group, sample) cells from the same exact traces, one budget for all groups.
- ``cosine[A]``: mean cosine to the exact gradient.
- ``memory_weight``: degrees of freedom in the run's trace memory (the training run feeds it: the ``/memory``
  rows allocate from it).
- ``level``: per group, the mean of the oracle's measured traces; ``level_ratio``: that over the group's noise
  width times its mean clean-pass proxy, the same for every group where ``joint`` (LR on clean proxies) puts
  the groups on one scale.

Allocators are named ``kind/signal`` (``neyman/clean``: Neyman from the clean-pass proxy; ``/memory``:
from the run's per-sample trace memory; ``/pilot``: from this step's pilot, not reused;
``joint``: Neyman over (group, sample) cells, ``allocator.joint``).

    python jobs/bench_allocation.py --quick --out runs/bench_allocation
    ray job submit --working-dir . -- python jobs/bench_allocation.py --out runs/bench_allocation
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from flops_ray import FarmConfig, TrainConfig, Trainer, create_model, digits
from flops_ray.config import GroupConfig
from flops_ray.studies.allocation_study import compare_allocators
from flops_ray.studies.job_cli import job_parser, run_main
from flops_ray.studies.results import write_result


@dataclass(frozen=True)
class Setting:
    """One model and budget the benchmark trains and measures."""

    model: str = "digits_vit_pretrained"
    batch_size: int = 32
    queries_per_sample: int = 16
    blocks: tuple[str, int] | None = None
    """One layer group per block, each a block's MLP output projection, plus the head, instead of the default
    config's two groups: the module pattern with ``{i}`` for the block (``blocks.{i}.mlp.fc2``) and the block
    count."""
    allocators: tuple[str, ...] | None = None
    """Compared with equal allocation in this setting (None: the benchmark's ``allocators``)."""


PER_BLOCK = ("neyman/memory", "neyman/clean", "joint")
"""The allocators compared where each block is a group."""
VIT_BLOCKS = ("blocks.{i}.mlp.fc2", 4)
"""The digits ViT's blocks."""
MIXER_BLOCKS = ("blocks.{i}.mlp_channels.fc2", 6)
"""The digits MLP-Mixer's blocks (its channel MLPs)."""


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark measures."""

    settings: tuple[Setting, ...] = (
        Setting(),
        Setting(batch_size=64, queries_per_sample=8),
        Setting("digits_vit"),
        Setting(blocks=VIT_BLOCKS, allocators=PER_BLOCK),
        Setting("digits_mixer_pretrained", blocks=MIXER_BLOCKS, allocators=PER_BLOCK),
    )
    """The first is the headline (the default config's model and budget)."""
    steps: int = 300
    """Length of each training run."""
    checkpoints: tuple[int, ...] = (0, 60, 120, 180, 240, 300)
    """Steps at which allocations are compared (the batch the step would train on)."""
    reps: int = 200
    """Paired repetitions per allocator and checkpoint."""
    allocators: tuple[str, ...] = (
        "bernoulli",
        "gaussian/clean",
        "neyman/pilot",
        "neyman/memory",
        "neyman/clean",
        "joint",
    )
    """Compared with equal allocation (``kind/signal``)."""
    oracle_pilot: int = 64
    """Queries per sample behind the oracle's traces (not charged to the budget)."""
    seed: int = 0


QUICK = BenchConfig(
    settings=(Setting(), Setting("digits_mixer_pretrained", blocks=MIXER_BLOCKS, allocators=PER_BLOCK)),
    steps=150,
    checkpoints=(0, 75, 150),
    reps=200,
)


def per_block_groups(base: tuple[GroupConfig, ...], blocks: tuple[str, int]) -> tuple[GroupConfig, ...]:
    """One group per block (the module ``pattern`` names with ``{i}``, the top group's sigma) and the head."""
    (top, head), (pattern, count) = base, blocks
    return (
        *(dataclasses.replace(top, name=f"block{i}", modules=(pattern.format(i=i),)) for i in range(count)),
        head,
    )


def run_setting(bench: BenchConfig, setting: Setting) -> list[dict]:
    """Train the default config at ``setting`` and measure at every checkpoint."""
    base = TrainConfig()
    cfg = base.replace(
        model=setting.model,
        batch_size=setting.batch_size,
        steps=bench.steps,
        seed=bench.seed,
        groups=tuple(
            dataclasses.replace(g, queries_per_sample=setting.queries_per_sample)
            for g in (per_block_groups(base.groups, setting.blocks) if setting.blocks else base.groups)
        ),
        # Every step's main queries return their per-sample traces: the memory the /memory and joint rows read is fed.
        estimator=dataclasses.replace(base.estimator, telemetry_every=1),
        farm=FarmConfig(backend="local"),
    )
    model = create_model(cfg.model, cfg.data.num_classes, cfg.data.img_size, cfg.seed)
    rows = []
    with Trainer(cfg, model, digits("train"), digits("test")) as trainer:
        for s in bench.checkpoints:
            trainer.fit(s - trainer.step_count)
            row = compare_allocators(trainer, setting.allocators or bench.allocators, bench.reps, bench.oracle_pilot)
            print(
                f"step {row['step']:4d}: " + "  ".join(f"{k} {v:.3f}" for k, v in row["mse_ratio"].items()), flush=True
            )
            print("  level / (width x proxy): " + " ".join(f"{r:.2f}" for r in row["level_ratio"] if r), flush=True)
            rows.append(row)
    return rows


def table(checkpoints: list[dict]) -> str:
    """MSE ratios to equal allocation as a Markdown table: a row per allocator, a column per checkpoint."""
    names = list(checkpoints[0]["mse_ratio"])
    lines = [
        "| allocator | " + " | ".join(f"step {c['step']}" for c in checkpoints) + " |",
        "|---" * (len(checkpoints) + 1) + "|",
    ]
    lines += [f"| {n} | " + " | ".join(f"{c['mse_ratio'][n]:.3f}" for c in checkpoints) + " |" for n in names]
    return "\n".join(lines)


def main(bench: BenchConfig, out: Path) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    default = TrainConfig().allocator
    settings = []
    for setting in bench.settings:
        print(f"{setting}", flush=True)
        settings.append({**dataclasses.asdict(setting), "checkpoints": run_setting(bench, setting)})
    result = {
        "default_allocator": f"{default.kind}/{default.signal}",
        "checkpoints": settings[0]["checkpoints"],
        "settings": settings,
        "config": dataclasses.asdict(bench),
        "seconds": time.perf_counter() - t0,
    }
    path = write_result(out, "bench_allocation", result)
    print(table(result["checkpoints"]))
    print(f"wrote {path} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    run_main(
        job_parser(
            __doc__,
            "bench_allocation",
            "two settings (the default; a second model family, an MLP-Mixer, a group per block), 3 checkpoints over "
            "150 steps each",
        ),
        lambda args: main(QUICK if args.quick else BenchConfig(), args.out),
    )
