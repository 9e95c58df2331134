"""The DNI studies: the signal study's offline fit against the best predictor computed by hand,
its runs wired to the rule's own stages and diagnostics; the recipe study's probes, divergence
and choice; and what DNI's chosen defaults learn."""

from dataclasses import replace

import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from bench import prepare
from bench.config import RunConfig, UsageError
from bench.executors.sequential import train_step
from bench.studies import dni_recipe, dni_signal

TINY = replace(
    dni_signal.FIDELITY,
    task="digits",
    model="small-cnn",
    groups=3,
    split="flops",
    width=1.0,
    batch_size=32,
    limit_train=512,
    limit_test=256,
    options={"synth_filters": 8, "synth_lr": 1e-4, "net_optimizer": "run"},  # as studied
)


def toy(n, generator):
    """h: random maps; g = a linear map of h at each pixel + a map fixed by the label, which a
    label-blind predictor can know only as its mean over the labels."""
    h = torch.randn(n, 3, 4, 4, generator=generator)
    y = torch.randint(0, 4, (n,), generator=generator)
    return h, y


def test_the_offline_fit_reaches_the_best_label_blind_predictor():
    g0 = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 3, generator=g0)
    by_label = 3.0 * torch.randn(4, 3, 4, 4, generator=g0)

    def target(h, y):
        return torch.einsum("nchw,cd->ndhw", h, mix) + by_label[y]

    h, y = toy(16384, g0)
    h_test, y_test = toy(1024, g0)
    g, g_test = target(h, y), target(h_test, y_test)
    # the best label-blind predictor, E[g | h]: the label's part replaced by its mean
    best = torch.einsum("nchw,cd->ndhw", h_test, mix) + by_label.mean(0)
    expected = (
        sum(
            F.cosine_similarity(best[i : i + 256].flatten(), g_test[i : i + 256].flatten(), dim=0)
            for i in range(0, 1024, 256)
        )
        / 4
    )
    assert 0.4 < expected < 0.8  # the label's part matters, and so does h's

    blind = dni_signal.fit_synthesizer(
        h, g, y, conditioned=False, filters=16, epochs=4, lr=3e-3, classes=4
    )
    cosine, ratio = dni_signal.cosine(blind, h_test, g_test, y_test)
    assert cosine == pytest.approx(float(expected), abs=0.03)
    assert cosine < expected + 0.02  # no label-blind predictor does better
    assert ratio == pytest.approx(cosine, abs=0.05)  # an L2 fit's residual is orthogonal to it
    conditioned = dni_signal.fit_synthesizer(
        h, g, y, conditioned=True, filters=16, epochs=4, lr=3e-3, classes=4
    )
    assert dni_signal.cosine(conditioned, h_test, g_test, y_test)[0] > 0.95


def test_the_study_runs_the_rule_and_reports_every_stage(isolated_env):
    rows = dni_signal.run(
        TINY, steps=4, samples=128, held_out=64, epochs=1, later=(2,), progress=lambda text: None
    )
    parts = {(r["part"], r["stage"], r["synthesizer"]) for r in rows}
    for part in (
        "online, as published",
        "online, synthesizers at lr 0.001",
        "online, groups at lr 0",
    ):
        assert {(part, k, "label-blind") for k in (1, 2)} <= parts
    for k in (1, 2):
        assert {("offline fit", k, "label-blind"), ("offline fit", k, "conditioned")} <= parts
    assert [(r["step"], r["stage"]) for r in rows if r["part"] == "staleness"] == [(6, 2)]
    assert all(-1 <= r["synth_cosine"] <= 1 and r["synth_norm_ratio"] >= 0 for r in rows)
    assert "offline fit" in dni_signal.format_table(rows)


def test_groups_at_lr_0_do_not_move(isolated_env):
    """The 'targets stand still' run: the groups keep their weights; the synthesizers learn."""
    prep = dni_signal.prepare.prepare(TINY)
    dni_signal.hold_groups(prep.stages)
    before = [[p.detach().clone() for p in s.group.parameters()] for s in prep.stages]
    synth = [p.detach().clone() for p in prep.stages[0].synth.parameters()]
    stream = dni_signal.batches(prep.task, TINY.batch_size, torch.Generator().manual_seed(0))
    dni_signal.train(prep.stages, stream, 0, 3)
    for stage, saved in zip(prep.stages, before):
        assert all(torch.equal(p, q) for p, q in zip(stage.group.parameters(), saved))
    assert any(not torch.equal(p, q) for p, q in zip(prep.stages[0].synth.parameters(), synth))


def test_a_rule_other_than_dni_is_refused():
    with pytest.raises(UsageError, match="DNI"):
        dni_signal.run(replace(TINY, method="lc", options={}), steps=1)


def test_missing_data_is_one_line_and_exit_2(isolated_env, offline, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dni_signal.main(["--data-dir", str(tmp_path / "nothing"), "--steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dni_signal: ") and "\n" not in err


def test_an_unwritable_output_is_one_line_and_exit_2(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(SystemExit) as e:
        dni_signal.main(["--out", str(blocked / "rows.csv"), "--steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dni_signal: cannot write") and "\n" not in err


def test_main_writes_the_rows(isolated_env, monkeypatch, tmp_path):
    monkeypatch.setattr(dni_signal, "FIDELITY", TINY)
    out = tmp_path / "study" / "rows.csv"
    dni_signal.main(
        ["--steps", "2", "--samples", "64", "--held-out", "32", "--epochs", "1", "--out", str(out)]
    )
    frame = pd.read_csv(out)
    assert list(frame.columns) == [
        "part",
        "stage",
        "synthesizer",
        "step",
        "synth_cosine",
        "synth_norm_ratio",
    ]
    assert sorted(frame[frame.part == "staleness"].step) == [7, 17, 42]
    assert list(out.parent.iterdir()) == [out]  # no temporary file left


def test_dni_defaults_learn_a_signal_of_the_true_gradients_scale():
    """DNI's and cDNI's defaults on a small task: after a few dozen steps the synthetic
    gradient points with the true one (synth_cosine above 0) and its norm is within 10x of
    the true gradient's (from its zero-initialised start Adam overshoots for ~20 steps)."""
    for method in ("dni", "cdni"):
        cfg = RunConfig(
            method=method,
            task="digits",
            groups=2,
            batch_size=32,
            limit_train=2048,
            limit_test=256,
            device="cpu",
        )
        prep = prepare.prepare(cfg)
        generator = torch.Generator().manual_seed(0)
        x_probe, y_probe = next(iter(prep.task.test_batches(256)))
        probes, step = {}, 0
        for _ in range(3):
            for x, y in prep.task.train_batches(32, generator):
                train_step(prep.stages, step, x, y)
                step += 1
                if step in (40, 80, 120, 160):
                    probes[step] = dni_recipe.probe(prep.stages, x_probe, y_probe)["1"]
        ratios = [p["synth_norm_ratio"] for p in probes.values()]
        cosines = [p["synth_cosine"] for p in probes.values()]
        assert all(0.1 < r < 10 for r in ratios), (method, probes)
        assert sum(cosines[1:]) / 3 > 0.02, (method, probes)


def test_the_recipe_study_probes_its_steps_and_stops_a_diverging_run():
    cfg = RunConfig(
        method="dni",
        task="digits",
        groups=2,
        epochs=1,
        batch_size=8,
        limit_train=896,
        limit_test=64,
        device="cpu",
    )
    rows = dni_recipe.train(cfg, progress=lambda text: None)
    end, probes = rows[0], rows[1:]
    assert end["stage"] == 0 and not end["diverged"] and 0 <= end["test_acc"] <= 1
    assert [r["step"] for r in probes] == [10, 100, 112]  # 10, 100 and the last of 112 steps
    assert all({"synth_cosine", "synth_norm_ratio"} <= set(r) for r in probes)
    wild = replace(cfg, lr=1e4, options={"net_optimizer": "run"})
    rows = dni_recipe.train(wild, progress=lambda text: None)
    assert rows[0]["diverged"] and rows[0]["test_acc"] == 0.1  # chance, 10 classes
    assert rows[0]["step"] < 112


def test_the_recipe_is_chosen_by_accuracy_above_the_floor_then_by_least_departure():
    names = {c.name: c for c in dni_recipe.CANDIDATES}
    published, lcbench = "(a) adam 1e-3", "(d) sgd, rms fit"
    rows = [
        {"setting": s, "method": "frozen", "candidate": "reference", "stage": 0, "test_acc": 0.5}
        for s in ("cifar", "fmnist")
    ]
    for setting in ("cifar", "fmnist"):
        for method in ("dni", "cdni"):
            rows.append(
                {
                    "setting": setting,
                    "method": method,
                    "candidate": published,
                    "stage": 0,
                    "test_acc": 0.50,
                    "diverged": False,
                }
            )
            rows.append(
                {
                    "setting": setting,
                    "method": method,
                    "candidate": lcbench,
                    "stage": 0,
                    "test_acc": 0.505,
                    "diverged": False,
                }
            )
    best, mean = dni_recipe.choose(pd.DataFrame(rows))
    assert mean[lcbench] == pytest.approx(0.005) and mean[published] == pytest.approx(0.0)
    assert best is names[published]  # within a point of the best, and published
    rows = [r if r["candidate"] != lcbench else {**r, "test_acc": 0.53} for r in rows]
    assert dni_recipe.choose(pd.DataFrame(rows))[0] is names[lcbench]  # 3 points better


def test_the_recipe_study_refuses_bad_settings_and_an_unwritable_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dni_recipe.parse_args(["--settings", "mnist"])
    assert e.value.code == 2 and "--settings takes cifar, fmnist" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(SystemExit) as e:
        dni_recipe.main(["--settings", "fmnist", "--out", str(blocked / "x.csv")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "cannot write" in err
