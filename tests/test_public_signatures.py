"""The public entry points show real defaults: help(coft_fast.train) reads None or a plain value for
every argument (no `<object object at ...>` sentinel), and an argument left at None changes nothing
in the config (the config's or the recipe's value stands)."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import coft_fast
from coft_fast.api import given_fields, resolve_config

PLAIN = (type(None), bool, int, float, str, tuple, frozenset)
ENTRY_POINTS = [coft_fast.train, coft_fast.clean_labels, coft_fast.zeroshot, coft_fast.testbed, coft_fast.demo,
                coft_fast.predict, coft_fast.export, coft_fast.report]


@pytest.mark.parametrize("function", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_every_default_is_a_plain_value(function):
    for name, parameter in inspect.signature(function).parameters.items():
        default = parameter.default
        if default is inspect.Parameter.empty:
            continue
        assert type(default) in PLAIN, f"{function.__name__}({name}=...) defaults to {default!r}"
    assert "object at 0x" not in str(inspect.signature(function))


CONFIG_ARGUMENTS = {"model", "pretrained", "method", "templates", "out", "labeled", "labeled_split"}


@pytest.mark.parametrize("function", [coft_fast.train, coft_fast.clean_labels, coft_fast.zeroshot],
                         ids=lambda f: f.__name__)
def test_each_none_default_is_documented(function):
    """Every argument that sets a config key says in the docstring that None leaves the key alone."""
    doc = " ".join(inspect.getdoc(function).split())
    assert "left at None take the config's value" in doc
    for name, parameter in inspect.signature(function).parameters.items():
        if name in CONFIG_ARGUMENTS:
            assert parameter.default is None and f"``{name}``" in doc, f"{function.__name__}: {name}"


# every argument of train / zeroshot / clean_labels / testbed that sets a config key, left at None
ALL_NONE = dict(model__name=None, model__pretrained=None, method=None, run__out_dir=None, data__labeled=None,
                data__labeled_split=None, zeroshot__templates=None, testbed__per_class=None, seed=None)


@pytest.mark.parametrize("command", ["train", "zeroshot"])
def test_arguments_left_at_none_leave_the_default_config_unchanged(command):
    assert given_fields(**ALL_NONE) == {}
    assert resolve_config(command=command, **given_fields(**ALL_NONE)) == resolve_config(command=command)


def test_arguments_left_at_none_leave_a_recipe_and_overrides_unchanged():
    overrides = ["run.out_dir=/tmp/x", "model.pretrained=laion2b_s34b_b88k", "data.labeled=/tmp/shots",
                 "data.labeled_split=train", "seed=3"]
    given = resolve_config(overrides=overrides, recipe="testbed", **given_fields(**ALL_NONE))
    assert given == resolve_config(overrides=overrides, recipe="testbed")
    assert given.run.out_dir == "/tmp/x" and given.model.pretrained == "laion2b_s34b_b88k" and given.seed == 3


def test_explicit_arguments_set_their_keys():
    cfg = resolve_config(overrides=["run.out_dir=/tmp/x", "data.labeled=/tmp/shots"], **given_fields(
        model__name="ViT-B-32", model__pretrained="none", method="self-train", run__out_dir="",
        data__labeled="", seed=5))
    assert cfg.model.name == "ViT-B-32"
    assert cfg.model.pretrained is None  # "none": random weights
    assert cfg.method == "self-train" and cfg.seed == 5
    assert cfg.run.out_dir is None and cfg.data.labeled is None  # "": none, even where the config names one
    assert resolve_config(**given_fields(run__out_dir=Path("runs") / "a")).run.out_dir == str(Path("runs") / "a")
