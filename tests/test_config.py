"""Bad configuration fails early with an error naming the field."""

from __future__ import annotations

import pytest
from torch import nn

from flops_ray.config import (
    AllocatorConfig,
    ConfigError,
    EstimatorConfig,
    FarmConfig,
    GroupConfig,
    TrainConfig,
    UnknownNameError,
)
from flops_ray.config.plain import config_from_dict, config_to_dict
from flops_ray.models.factory import create_model
from flops_ray.replica.engine import QueryEngine
from flops_ray.step.checks import check_config


def _group(**kw) -> GroupConfig:
    return GroupConfig(**{"name": "g", "modules": ("head",), "sigma": 0.1, "queries_per_sample": 8, **kw})


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (
            TrainConfig(groups=(_group(queries_per_sample=2),), estimator=EstimatorConfig(pilot_queries=4)),
            r"groups\[g\]\.queries_per_sample.*below the floor",
        ),
        (
            TrainConfig(
                groups=(_group(queries_per_sample=4),),
                estimator=EstimatorConfig(pilot_queries=4),
                allocator=AllocatorConfig("neyman", signal="pilot"),
            ),
            r"queries_per_sample.*below the floor 6x32 .*pilot plus one more draw",
        ),
        (TrainConfig(groups=(_group(sigma=0.0),)), r"groups\[g\]\.sigma"),
        (TrainConfig(groups=(_group(sigma=-1.0),)), r"groups\[g\]\.sigma"),
        (TrainConfig(groups=(_group(modules=()),)), r"groups\[g\]\.modules: empty layer group"),
        (TrainConfig(groups=(_group(queries_per_sample=7),)), r"queries_per_sample.*even"),
        (TrainConfig(groups=()), r"groups"),
        (TrainConfig(groups=(_group(), _group())), r"unique"),
        (TrainConfig(batch_size=0), r"batch_size"),
        (TrainConfig(steps=0), r"^steps: must be >= 1"),
        (TrainConfig(eval_every=-3), r"^eval_every: must be >= 0"),
        (TrainConfig(lr=0.0), r"^lr"),
        (TrainConfig(estimator=EstimatorConfig(kind="adjoint")), r"estimator\.kind"),
        (TrainConfig(estimator=EstimatorConfig(floor=3)), r"estimator\.floor"),
        (TrainConfig(estimator=EstimatorConfig(pilot_queries=3)), r"estimator\.pilot_queries"),
        (TrainConfig(allocator=AllocatorConfig(signal="oracle")), r"allocator\.signal"),
        (
            TrainConfig(
                estimator=EstimatorConfig(kind="spsa", pilot_queries=2),
                allocator=AllocatorConfig("neyman", signal="pilot"),
            ),
            r"estimator\.pilot_queries: neyman allocation from the pilot \(allocator\.signal=pilot\) reads trace",
        ),
        (TrainConfig(estimator=EstimatorConfig(on_nonfinite="ignore")), r"estimator\.on_nonfinite"),
        (TrainConfig(farm=FarmConfig(replicas=0)), r"farm\.replicas"),
        (
            TrainConfig(farm=FarmConfig(replicas="3..1")),
            r"farm\.replicas: must be >= 1 \(and min <= max\), got '3\.\.1'",
        ),
        (TrainConfig(farm=FarmConfig(replicas="two")), r"farm\.replicas: must be a number or a range 'min\.\.max'"),
        (TrainConfig(farm=FarmConfig(snapshot_every=-1)), r"farm\.snapshot_every"),
        (TrainConfig(farm=FarmConfig(reduction="scalar")), r"farm\.reduction: scalar needs an SPSA or ES estimator"),
        (TrainConfig(farm=FarmConfig(stall_timeout_s=0)), r"farm\.stall_timeout_s"),
        (TrainConfig(farm=FarmConfig(reduction="ring")), r"farm\.reduction"),
    ],
)
def test_bad_values_name_the_field(cfg, field):
    with pytest.raises(ConfigError, match=field):
        check_config(cfg)


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown keys \['lerning_rate'\]"):
        config_from_dict({"lerning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"allocator: unknown keys \['kind_'\]"):
        config_from_dict({"allocator": {"kind_": "equal"}})


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"lr": "fast"}, r"^lr: must be a number, got 'fast'"),
        ({"steps": "ten"}, r"^steps: must be an integer, got 'ten'"),
        ({"steps": 2.5}, r"^steps: must be an integer, got 2.5"),
        ({"batch_size": 8.5}, r"^batch_size: must be an integer"),
        ({"farm": {"replicas": 1.5}}, r"^farm\.replicas: must be a number or a range"),
        ({"farm": {"replicas": "1.5"}}, r"^farm\.replicas: must be a number or a range"),
        ({"farm": {"replicas": [2]}}, r"^farm\.replicas: must be an integer, or a string, got \[2\]"),
        ({"groups": [{"name": "g", "modules": ["head"], "sigma": 0.1, "queries_per_sample": "lots"}]}, r"groups\[0\]"),
        ({"backprop": "yes"}, r"^backprop: must be true or false"),
    ],
)
def test_types_are_checked_at_load(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_dict_round_trip():
    cfg = TrainConfig()
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_unknown_module_names_the_pattern():
    model = create_model("digits_vit", 10, 8, 0)
    bad = (GroupConfig("g", ("blocks.9.*",), 0.1, 8),)
    with pytest.raises(ConfigError, match=r"groups\[g\]\.modules: pattern 'blocks.9.\*' matches no module"):
        QueryEngine(model, bad, EstimatorConfig(), 0)


def test_model_without_linears_rejects_lr():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    groups = (GroupConfig("g", ("0",), 0.1, 8),)
    with pytest.raises(ConfigError, match=r"LR needs nn\.Linear"):
        QueryEngine(model, groups, EstimatorConfig(kind="lr"), 0)
    QueryEngine(model, groups, EstimatorConfig(kind="spsa"), 0)  # parameters exist: SPSA is fine


def test_overlapping_groups_are_rejected():
    model = create_model("digits_vit", 10, 8, 0)
    groups = (GroupConfig("a", ("head",), 0.1, 8), GroupConfig("b", ("hea*",), 0.1, 8))
    with pytest.raises(ConfigError, match=r"already in group 'a'"):
        QueryEngine(model, groups, EstimatorConfig(), 0)


def test_unknown_model_is_named():
    with pytest.raises(
        UnknownNameError, match=r"^model: must be one of \[.*'digits_vit'.*\] or a timm model name, got 'not_a_model'"
    ):
        create_model("not_a_model", 10, 8, 0)


def test_old_farm_keys_still_load_with_a_warning():
    with pytest.warns(FutureWarning, match=r"farm\.workers is now farm\.replicas"):
        cfg = config_from_dict({"farm": {"workers": "2..4", "num_cpus_per_worker": 0.5}})
    assert (cfg.farm.replicas, cfg.farm.num_cpus_per_replica) == ("2..4", 0.5)
