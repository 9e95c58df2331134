"""Bad input, drawn at random: every value-taking option of `lcbench run` (read from the
command itself, so a new option is covered without being listed here), every rule option
(read from the rules' option classes) and every field a sweep spec may set. Each draw ends
in exit 2 with one line and nothing written, or in a run that starts (``runner.execute`` is
stopped at its door: what is checked is everything before it)."""

import dataclasses
import json
import math
import typing

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import methods
from bench import cli as cli_module
from bench import runner, sweep
from bench.cli import main
from bench.config import RunConfig

#: options that name where things go: drawn elsewhere (unwritable folders have their tests)
PLACES = {"out", "data_dir", "emit_config", "experiment"}
BASE = [
    "--task",
    "digits",
    "--epochs",
    "1",
    "--limit-train",
    "64",
    "--limit-test",
    "32",
    "--quiet",
    "--no-checkpoint",
]
DRAWS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Started(BaseException):
    """The run reached ``runner.execute``: every check before it passed."""


def numbers(integer: bool):
    """Zero, negative, small, huge, non-finite and non-numeric text."""
    values = st.integers(-3, 12) | st.sampled_from([10**9, 10**15, -(10**9)])
    if not integer:
        values = (
            values
            | st.floats(allow_nan=True, allow_infinity=True)
            | st.sampled_from([0.0, -0.5, 1e-300, 1e300])
        )
    return values.map(str) | st.sampled_from(["", "x", "1,2", "nan", "--", "1e999"])


def names(valid):
    return st.sampled_from(list(valid)) | st.sampled_from(["", "bogus", "LC ", "../x", "0"])


def value_for(param: click.Option):
    """A strategy of command-line values for ``param``, from its type and name."""
    if isinstance(param.type, click.Choice):
        return names(param.type.choices)
    if param.type is click.INT:
        return numbers(True)
    if param.type is click.FLOAT:
        return numbers(False)
    known = {
        "method": list(methods.METHODS),
        "task": ["digits", "cifar10", "ptb"],
        "model": ["small-cnn", "resnet8", "lstm", "dni-cnn"],
        "split": ["flops", "time", "paper", "params"],
        "executor": ["sequential", "distributed", "ddp"],
        "device": ["cpu", "cuda", "cuda:7"],
        "placement": ["stage", "neuron"],
        "precision": ["fp32", "bf16", "fp8"],
    }
    if param.name in known:
        return names(known[param.name])
    if param.name in ("cuts", "lr_milestones"):
        ints = st.lists(st.integers(-2, 40), max_size=4).map(lambda xs: ",".join(map(str, xs)))
        return ints | st.sampled_from(["3,2", "a,b", "1,,2", "2.5"])
    if param.name == "option_pairs":
        return rule_option()
    return st.text(max_size=8)


@st.composite
def rule_option(draw):
    """``KEY=VALUE`` for a rule's option (or an unknown key), the value of any kind."""
    method = methods.resolve(draw(st.sampled_from(list(methods.METHODS))))
    keys = [f.name for f in dataclasses.fields(method.options)] + ["bogus"]
    value = draw(numbers(False) | st.sampled_from(["true", "false", "group", "l2", "rms", "x"]))
    return f"{draw(st.sampled_from(keys))}={value}"


RUN_OPTIONS = [
    p
    for p in cli_module.run.params
    if isinstance(p, click.Option) and not p.is_flag and p.name not in PLACES
]


def test_every_value_option_of_run_is_drawn():
    """The draws below cover every option `lcbench run` takes a value for."""
    assert {p.name for p in RUN_OPTIONS} >= {
        "groups",
        "batch_size",
        "lr",
        "width",
        "threads",
        "workers",
        "option_pairs",
        "iterations",
    }


@pytest.fixture
def stop_at_execute(monkeypatch):
    def execute(prep, **_):
        raise Started(prep.cfg)

    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(sweep.runner, "execute", execute)


def outcome(argv, out, capsys) -> None:
    """Exit 2 with one line and nothing under ``out``, or a run that starts; for a sweep
    also exit 1 with its cell recorded as failed, one line saying why (a cell that cannot
    be built is the sweep's to record, and the sweep goes on)."""
    capsys.readouterr()  # what earlier draws printed
    try:
        main(argv)
    except Started:
        return
    except SystemExit as e:
        _, err = capsys.readouterr()
        assert "Traceback" not in err, err
        if argv[0] == "sweep" and e.code == 1:
            (info,) = [json.loads(p.read_text()) for p in out.rglob("run.json")]
            assert info["status"] == "failed" and "\n" not in info["error"].strip(), info
            assert "allocate" not in info["error"], info  # refused before it was built
            return
        assert e.code == 2 and err.count("\n") == 1 and err.startswith("lcbench: error:"), (
            argv,
            err,
        )
        assert not out.exists() or not any(out.rglob("*")), (argv, list(out.rglob("*")))
        return
    pytest.fail(f"{argv}: neither a usage error nor a run")


@DRAWS
@given(
    draws=st.lists(
        st.sampled_from(RUN_OPTIONS).flatmap(lambda p: st.tuples(st.just(p), value_for(p))),
        min_size=1,
        max_size=3,
    ),
    method=names(methods.METHODS),
)
def test_run_options_drawn_at_random_are_refused_in_one_line_or_start_a_run(
    draws, method, tmp_path_factory, stop_at_execute, capsys
):
    out = tmp_path_factory.mktemp("run") / "out"
    argv = ["run", "--method", method, *BASE, "--out", str(out)]
    for param, value in draws:
        argv += [param.opts[-1], value]
    outcome(argv, out, capsys)


FIELDS = {
    k: v
    for k, v in typing.get_type_hints(RunConfig).items()
    if k not in (*RunConfig.OUTPUT_FIELDS, "options", "method")
}


def toml_value():
    """A TOML literal of any kind: numbers of every sign and size, strings, lists."""
    literal = (st.integers(-3, 12) | st.sampled_from([10**9, -(10**9)])).map(str)
    literal = literal | st.floats(-1e9, 1e9, allow_nan=False).map(repr)
    literal = literal | st.sampled_from(['"x"', '""', "true", "nan", "inf", "[1, 2]", "[]"])
    return literal


@DRAWS
@given(key=st.sampled_from(sorted(FIELDS)), data=st.data())
def test_sweep_settings_drawn_at_random_are_refused_in_one_line_or_start_a_run(
    key, data, tmp_path_factory, stop_at_execute, capsys
):
    root = tmp_path_factory.mktemp("sweep")
    value = data.draw(toml_value())
    method = data.draw(names(methods.METHODS))
    option = data.draw(rule_option())
    name, _, option_value = option.partition("=")
    option_value = option_value if _is_toml_number(option_value) else f'"{option_value}"'
    spec = root / "spec.toml"
    spec.write_text(
        f'[grid]\nmethod = ["{method}"]\n\n[settings]\ntask = "digits"\n'
        f"epochs = 1\nlimit_train = 64\nlimit_test = 32\n"
        + (
            f"{key} = {value}\n"
            if key not in ("task", "epochs", "limit_train", "limit_test")
            else ""
        )
        + f"\n[options.{methods.ALIASES.get(method, method) or 'lc'}]\n"
        f"{name} = {option_value}\n"
    )
    out = root / "out"
    outcome(["sweep", str(spec), "--out", str(out), "--quiet"], out, capsys)


def _is_toml_number(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and text.strip() == text and text not in ("", "nan")
    except ValueError:
        return text in ("true", "false")
