"""Config YAML as a hostile file may hold it: alias bombs, keys given twice, huge values, broken syntax."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from flops_ray.app.job_config import MAX_VALUES, load_config
from flops_ray.config import ConfigError, JobConfig, TrainConfig
from flops_ray.config.validation import MAX_MESSAGE

BOMB = (
    '[&a ["x","x","x","x","x","x","x","x","x"], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], '
    "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e]]"
)
"""A few hundred bytes of YAML whose aliases expand to 9**6 = 531,441 strings."""


def _union_fields(cls: type, where: str = "") -> list[str]:
    """The dotted names of every union-typed field (``int | str``) of ``cls`` and its sections."""
    found = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            found += _union_fields(tp, f"{where}{name}.")
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):
            found.append(where + name)
    return found


UNION_FIELDS = _union_fields(TrainConfig) + _union_fields(JobConfig, "job.")


def _yaml(dotted: str, value: str) -> str:
    """A config setting ``dotted`` (``farm.replicas``) to the YAML ``value``."""
    *sections, field = dotted.split(".")
    lines = [f"{'  ' * i}{s}:" for i, s in enumerate(sections)]
    return "\n".join([*lines, f"{'  ' * len(sections)}{field}: {value}"]) + "\n"


def _error(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


def test_there_are_union_fields_to_check():
    assert {"farm.replicas", "pretrained"} <= set(UNION_FIELDS)


@pytest.mark.parametrize("field", UNION_FIELDS)
@pytest.mark.parametrize(
    "value",
    ["{a: 1}", "[1, 2]", "[" + ", ".join(["123456789"] * 5000) + "]", "2.5"],
    ids=["mapping", "list", "long", "float"],
)
def test_every_union_field_refuses_other_values_in_a_short_message(tmp_path, field, value):
    message = _error(tmp_path, _yaml(field, value))
    assert message.startswith(f"{field}: must be ") and len(message) < 300, message[:500]


@pytest.mark.parametrize("field", [*UNION_FIELDS, "steps", "groups"])
def test_an_alias_bomb_is_refused_in_one_short_line(tmp_path, field):
    message = _error(tmp_path, _yaml(field, BOMB))
    assert message == (
        f"{tmp_path / 'c.yaml'}: holds more than {MAX_VALUES:,} values once its aliases (*name) are expanded; "
        "a config has hundreds (an alias bomb?)"
    )


def test_an_alias_bomb_in_set_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set farm.replicas: holds more than"):
        load_config(None, [f"farm.replicas={BOMB}"])


def test_a_huge_value_gives_a_bounded_message(tmp_path):
    message = _error(tmp_path, "farm:\n  backend: " + "x" * 100_000 + "\n")
    assert len(message) <= MAX_MESSAGE and message.endswith("characters in all)")
    message = _error(tmp_path, "steps: [" + ", ".join(["1"] * 50_000) + "]\n")
    assert message == "steps: must be an integer, got [1, 1, 1, 1, 1, 1, 1, 1, ...]"


@pytest.mark.parametrize(
    "text, match",
    [
        ("steps: 3\nseed: 1\nsteps: 5\n", r"line 3: key 'steps' is given twice \(first on line 1\)"),
        ("farm:\n  replicas: 1\n  backend: ray\n  replicas: 2\n", r"line 4: key 'replicas' is given twice"),
        ("job:\n  out: a\n  out: b\n", r"line 3: key 'out' is given twice"),
    ],
    ids=["top", "section", "job"],
)
def test_a_key_given_twice_is_refused_naming_it(tmp_path, text, match):
    assert _error(tmp_path, text).startswith(str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "c.yaml")


def test_a_merge_may_override_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("farm:\n  <<: {replicas: 3, backend: local}\n  replicas: 2\n")
    assert load_config(path)[0].farm.replicas == 2


def test_broken_yaml_is_one_line_naming_where(tmp_path):
    message = _error(tmp_path, "steps: 3\nfarm: [1, 2\nseed: 1\n")
    assert message.startswith(f"{tmp_path / 'c.yaml'}: not valid YAML: ") and "(line " in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"^--set steps: not valid YAML: .*\(line 1, column"):
        load_config(None, ["steps=[1"])
