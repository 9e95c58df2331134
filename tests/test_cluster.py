"""The main job at its true size: a plan priced before anything runs, workers that share one
results folder, and jobs submitted to SLURM (a fake one on PATH) or run locally by submitit."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import sweep
from bench.cli import main
from bench.cluster import claims, launchers, plan
from bench.config import RunConfig, UsageError
from bench.forecast import predict, profiles
from tests.test_checkpoint import HOOK

ROOT = Path(__file__).resolve().parents[1]
TINY = """
[experiment]
name = "tiny"

[grid]
method = ["bp", "dgl", "lc"]
seed = [0, 1]

[settings]
task = "digits"
model = "mlp"
epochs = 1
batch_size = 64
limit_train = 256
limit_test = 128
device = "cpu"
"""


def spec(tmp_path, text=TINY, name="tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def call(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def worker(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "bench", "sweep", *map(str, args), "--quiet"],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def trained(logs: list[str]) -> Counter:
    """How often each run id was trained to its end, by the workers' lines."""
    done = Counter()
    for log in logs:
        for line in log.splitlines():
            parts = line.split()
            if line.startswith("run ") and len(parts) > 5 and parts[4] in ("ok", "failed"):
                done[parts[5]] += 1
    return done


def final_accuracy_rows(folder: Path) -> list[int]:
    with open(folder / "metrics.csv") as f:
        return [
            int(r["epoch"])
            for r in csv.DictReader(f)
            if r["metric"] == "test_acc" and not r["stage"]
        ]


def test_three_workers_on_one_folder_train_each_run_exactly_once(tmp_path):
    path, out = spec(tmp_path), tmp_path / "out"
    procs = [worker(path, "--out", out) for _ in range(3)]
    logs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        logs.append(stderr)
    cfgs = sweep.load_spec(path, out=str(out))
    assert len(cfgs) == 6
    assert trained(logs) == Counter({cfg.run_id: 1 for cfg in cfgs}), logs
    for cfg in cfgs:
        folder = out / "tiny" / cfg.run_id
        info = json.loads((folder / "run.json").read_text())
        assert info["status"] == "ok" and not info.get("resumes")
        assert final_accuracy_rows(folder) == [1]  # one epoch, written once
        assert not list(folder.glob(".*.tmp"))  # no half-written file left


def test_a_sigkilled_worker_leaves_a_run_that_a_later_worker_finishes_from_its_checkpoint(
    tmp_path,
):
    path = spec(
        tmp_path,
        TINY.replace("seed = [0, 1]", "seed = [0]")
        .replace('method = ["bp", "dgl", "lc"]', 'method = ["lc"]')
        .replace("epochs = 1", "epochs = 3"),
    )
    out, hook, ready = tmp_path / "out", tmp_path / "hook", tmp_path / "ready"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)  # sleeps in epoch 2
    env = {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "LCBENCH_TEST_READY": str(ready)}
    first = worker(path, "--out", out, env=env)
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline, "epoch 2 never started"
        time.sleep(0.05)
    (cfg,) = sweep.load_spec(path, out=str(out))
    folder = out / "tiny" / cfg.run_id
    assert claims.held(folder)
    assert plan.state_of(cfg) == ("running", 1, "")
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    assert not claims.held(folder)  # the claim died with its process
    assert plan.state_of(cfg) == ("partial", 1, "")
    later = worker(path, "--out", out)
    _, stderr = later.communicate(timeout=300)
    assert later.returncode == 0, stderr
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "ok" and [r["epoch"] for r in info["resumes"]] == [1]
    assert final_accuracy_rows(folder) == [1, 2, 3]


def test_a_reader_asking_whether_a_run_is_claimed_never_makes_a_worker_pass_it(tmp_path):
    """``claims.held`` takes the lock for an instant to ask; a worker that claims the run in
    that instant waits it out instead of passing the run by (a worker found a run "claimed"
    by the sweep that was reading its state, and the run was left to do)."""
    import threading

    folder, stop = tmp_path / "run", threading.Event()
    folder.mkdir()
    probes = []

    def read():
        while not stop.is_set():
            probes.append(claims.held(folder))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        won = []
        # at least 200 claims and 200 probes beside them, however loaded the machine (the
        # reader got 119 probes in during 200 claims under the whole suite)
        while (len(won) < 200 or len(probes) <= 200) and len(won) < 20_000:
            with claims.claim(folder) as mine:
                won.append(mine)
    finally:
        stop.set()
        reader.join()
    assert all(won) and len(probes) > 200
    assert True in probes  # the reader did see the worker's claims: the two met


def test_a_claimed_run_is_passed_by_and_a_free_one_is_trained(tmp_path, capsys):
    path, out = spec(tmp_path), tmp_path / "out"
    cfgs = sweep.load_spec(path, out=str(out))
    taken = tmp_path / "holder"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom bench.cluster import claims\n"
            f"with claims.claim({str(out / 'tiny' / cfgs[0].run_id)!r}) as mine:\n"
            f"    open({str(taken)!r}, 'w').write(str(mine)); time.sleep(120)",
        ],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while not taken.exists():
            assert holder.poll() is None, "the claim's holder died"
            assert time.monotonic() < deadline, "the claim's holder never took it"
            time.sleep(0.05)
        assert taken.read_text() == "True"
        code, stdout, err = call(["sweep", str(path), "--out", str(out), "-q"], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 0 and "5 ok, 0 skipped, 0 failed, 1 left to other workers" in stdout, err
    assert f"passed   {cfgs[0].run_id}  claimed by another worker" in err
    assert plan.state_of(cfgs[0])[0] == "todo"  # its holder died before training it


def test_shards_split_the_grid_without_overlap(tmp_path, capsys):
    items = list(range(7))
    parts = [claims.shard(items, f"{i}/3") for i in range(3)]
    assert sorted(sum(parts, [])) == items and parts[0] == [0, 3, 6]
    path, out = spec(tmp_path), tmp_path / "out"
    code, stdout, err = call(
        ["sweep", str(path), "--out", str(out), "--shard", "1/2", "-q"], capsys
    )
    assert code == 0 and "3 ok" in stdout, err
    assert not list(out.glob("tiny/*/.claim.lock"))  # no lock under --shard
    for bad in ("2/2", "x/2", "1"):
        code, _, err = call(["sweep", str(path), "--out", str(out), "--shard", bad], capsys)
        assert code == 2 and err.count("\n") == 1 and "--shard" in err, err


def test_list_scheduling_makespan_by_hand():
    # 4 devices, longest first: the 10 s job on all 4 (0-10); the 6 s and the 5 s jobs on 2
    # each (10-16, 10-15); the 3 s job on the first device free (15-18)
    jobs = [(3.0, 1), (10.0, 4), (6.0, 2), (5.0, 2)]
    assert plan.list_schedule(jobs, 4) == 18.0
    assert plan.list_schedule([(1.0, 8)], 4) == math.inf
    assert plan.list_schedule([(2.0, 1)] * 4, 2) == 4.0


def test_the_plan_prices_every_run_and_says_what_is_done(tmp_path, capsys):
    path, out = spec(tmp_path), tmp_path / "out"
    cfgs = sweep.load_spec(path, out=str(out))
    code, _, err = call(["sweep", str(path), "--out", str(out), "--shard", "0/6", "-q"], capsys)
    assert code == 0, err
    code, stdout, err = call(
        [
            "sweep",
            str(path),
            "--out",
            str(out),
            "--plan",
            "--profile",
            "a100-pcie",
            "--devices",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    with open(out / "tiny" / "plan.csv") as f:
        rows = {r["run_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == {c.run_id for c in cfgs}
    assert rows[cfgs[0].run_id]["state"] == "done"
    assert {r["state"] for r in list(rows.values())[1:]} == {"todo"}
    profile = profiles.load("a100-pcie")
    for cfg in cfgs:
        row = rows[cfg.run_id]
        seconds = plan.run_seconds(cfg, profile)
        assert float(row["forecast_s"]) == pytest.approx(seconds) and seconds > 0
        assert float(row["device_hours"]) == pytest.approx(int(row["devices"]) * seconds / 3600)
        assert int(row["time_limit_min"]) == math.ceil(seconds * 1.5 / 60) + 10
    with open(out / "tiny" / cfgs[0].run_id / "metrics.csv") as f:
        measured = sum(
            float(r["value"]) for r in csv.DictReader(f) if r["metric"] == "epoch_time_s"
        )
    done = rows[cfgs[0].run_id]
    assert float(done["measured_train_s"]) == pytest.approx(measured) and measured > 0
    ratio = measured / float(done["forecast_train_s"])
    assert float(done["measured_over_forecast"]) == pytest.approx(ratio)
    assert f"measured / forecast training time of the 1 done runs: median {ratio:.2f}" in stdout
    assert all(r["measured_train_s"] == "" for r in list(rows.values())[1:])
    assert "6 runs: 1 done, 0 running, 0 partial, 0 failed, 5 todo" in stdout
    left = sum(float(r["forecast_s"]) for r in list(rows.values())[1:])
    makespan = plan.list_schedule([(float(r["forecast_s"]), 1) for r in list(rows.values())[1:]], 2)
    assert makespan < left and f"{makespan / 3600:,.1f} h" in stdout


def test_a_run_priced_from_its_parts(tmp_path):
    """The sequential executor's batch is every stage's work on one device: DGL on K=2 costs
    more than BP's batch (its auxiliary nets), and its epoch is its batches plus evaluation.
    On ranks, each epoch also pays its fill: the first batch crosses both stages before the
    last one trains it, which the steady step does not hold."""
    profile = profiles.load("h100-sxm-nvlink")
    base = dict(task="digits", model="mlp", epochs=2, batch_size=64, device="cpu")
    bp = RunConfig(method="bp", groups=1, **base)
    dgl = RunConfig(method="dgl", groups=2, **base)
    (bp_step, bp_fill), (dgl_step, dgl_fill) = (plan.batch_seconds(c, profile) for c in (bp, dgl))
    assert dgl_step > bp_step and bp_fill == dgl_fill == 0.0
    steps = 1437 // 64
    evaluation = plan.run_seconds(bp, profile) - 2 * steps * bp_step
    assert evaluation > 0
    assert plan.run_seconds(RunConfig(method="bp", groups=1, **{**base, "epochs": 4}), profile) == (
        pytest.approx(4 * steps * bp_step + 2 * evaluation)
    )
    distributed = RunConfig(method="dgl", groups=2, executor="distributed", **base)
    assert plan.devices(distributed) == 2 and plan.devices(dgl) == 1
    step, fill = plan.batch_seconds(distributed, profile)
    times = plan._times(distributed, "dgl", profile)
    setup = predict.setup_of(distributed, plan.run_cuts(distributed))
    stages, _, _ = predict._build(times, setup, profile.link.link(), 64)
    crossing = sum(s.work_s for s in stages) + profile.link.link().message(stages[0].down_bytes)
    assert fill == pytest.approx(crossing - step) and fill > 0
    assert plan.priced(distributed, profile)[0] == pytest.approx(2 * (steps * step + fill))


def test_a_run_priced_at_the_cuts_it_trains_on():
    """The plan cuts a run where the run will (here: balanced by FLOPs with LC's critic at
    each cut), not where the forecast would balance it, and prices the floor as what it runs:
    the frozen groups forward only, the last group trained."""
    from bench import prepare
    from bench.data.tasks import TASKS

    profile = profiles.load("a100-pcie")
    lc = RunConfig(method="lc", groups=2, task="fashion-mnist", model="small-cnn", epochs=1)
    info = TASKS[lc.task]
    _, cuts = prepare.build_groups(lc, info.input_shape, info.num_classes)
    assert plan.run_cuts(lc) == tuple(cuts)
    times = plan._times(lc, "lc", profile)
    setup = predict.setup_of(lc, cuts)
    step = predict.one_device_step(times, setup, profile.link.link(), lc.batch_size)
    assert plan.batch_seconds(lc, profile) == pytest.approx((step, 0.0))
    assert plan.run_cuts(replace(lc, split="time")) is None

    frozen = replace(lc, method="frozen", groups=4).validated()
    _, cuts = prepare.build_groups(frozen, info.input_shape, info.num_classes)
    bp = plan._times(replace(frozen, method="bp"), "bp", profile)
    n, last = frozen.batch_size, cuts[-1]
    blocks = range(len(bp.work.blocks))
    expected = (
        bp.input(n)
        + sum(bp.forward(j, n) for j in blocks)
        + sum(bp.backward(j, n, j > last) + bp.update(j) for j in blocks if j >= last)
    )
    assert plan.batch_seconds(frozen, profile) == pytest.approx((expected, 0.0))
    assert (
        plan.batch_seconds(frozen, profile)[0]
        < plan.batch_seconds(replace(frozen, method="bp", groups=1), profile)[0]
    )


def test_each_run_priced_on_the_profile_calibrated_at_its_threads():
    """Where ranks share a CPU's cores, a run is priced on the profile calibrated at its
    threads per process; with one profile, or none that matches, on the first."""
    shipped = profiles.load("a100-pcie")
    one, two = (
        replace(shipped, name=f"t{t}", device=replace(shipped.device, threads=t)) for t in (1, 2)
    )
    cfg = RunConfig(method="dgl", groups=2, task="digits", model="mlp", threads=1)
    assert plan.profile_for(cfg, [two, one]) is one
    assert plan.profile_for(replace(cfg, threads=2), [one, two]) is two
    assert plan.profile_for(replace(cfg, threads=3), [one, two]) is one
    assert plan.profile_for(cfg, [two]) is two


def test_status_names_failed_runs_with_their_error(tmp_path, capsys):
    path = spec(tmp_path, TINY + '\n[presets.bad.grid]\nmethod = ["bp"]\nseed = [0]\nlr = [1e6]\n')
    out = tmp_path / "out"
    code, _, err = call(["sweep", str(path), "--out", str(out), "-p", "bad", "-q"], capsys)
    assert code == 1, err
    code, stdout, err = call(
        ["sweep", str(path), "--out", str(out), "-p", "bad", "--status"], capsys
    )
    assert code == 0, err
    (row,) = [line for line in stdout.splitlines() if line.strip().startswith("bp-")]
    assert " failed " in row and "non-finite training loss at epoch 1" in row
    assert "1 runs: 0 done, 0 running, 0 partial, 1 failed, 0 todo" in stdout
    assert not (out / "tiny" / "plan.csv").exists()  # --status prices nothing, writes nothing


def test_the_local_launcher_finishes_a_small_grid(tmp_path, capsys):
    path, out = spec(tmp_path, TINY.replace("seed = [0, 1]", "seed = [0]")), tmp_path / "out"
    code, stdout, err = call(
        ["sweep", str(path), "--out", str(out), "--launcher", "local", "--wait"], capsys
    )
    assert code == 0, (stdout, err)
    assert stdout.count("submitted job") == 3 and "3 jobs submitted (local)" in stdout
    assert "3 runs: 3 done, 0 running, 0 partial, 0 failed, 0 todo" in stdout
    code, stdout, _ = call(["sweep", str(path), "--out", str(out), "--launcher", "local"], capsys)
    assert code == 0 and "0 jobs submitted" in stdout  # nothing left to submit


FAKE_SBATCH = """#!{python}
import os, pathlib, subprocess, sys
state = pathlib.Path(os.environ["FAKE_SLURM"])
script = pathlib.Path(sys.argv[-1])
job = str(1000 + len(list(state.glob("job*.sh"))) + 1)
(state / f"job{{job}}.sh").write_text(script.read_text())
(state / f"job{{job}}.args").write_text(" ".join(sys.argv[1:]))
env = {{**os.environ, "SLURM_JOB_ID": job, "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
       "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
       "SLURM_JOB_NODELIST": "localhost"}}
if os.environ.get("FAKE_SLURM_RUN") == "1":
    subprocess.Popen(["bash", "-c", f'bash "{{script}}"; echo $? > "{{state}}/.exit{{job}}"; '
                      f'mv "{{state}}/.exit{{job}}" "{{state}}/exit{{job}}"'],
                     env=env, start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {{job}}")
"""
FAKE_SRUN = """#!{python}
import os, sys
args, i = sys.argv[1:], 0
while args[i].startswith("-"):
    i += 1 if args[i] in ("--unbuffered",) or "=" in args[i] else 2
job = os.environ["SLURM_JOB_ID"]
out = open(args[args.index("--output") + 1].replace("%j", job).replace("%t", "0"), "a")
os.dup2(out.fileno(), 1)
os.dup2(out.fileno(), 2)
os.execvp(args[i], args[i:])
"""
FAKE_SACCT = """#!{python}
import os, pathlib, sys
state = pathlib.Path(os.environ["FAKE_SLURM"])
print("JobID|State|NodeList")
for i, a in enumerate(sys.argv):
    if a == "-j":
        job = sys.argv[i + 1]
        done = state / f"exit{{job}}"
        word = "RUNNING" if not done.exists() else (
            "COMPLETED" if done.read_text().strip() == "0" else "FAILED")
        print(f"{{job}}|{{word}}|localhost")
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_, state = tmp_path / "bin", tmp_path / "slurm"
    bin_.mkdir()
    state.mkdir()
    for name, text in [("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", FAKE_SACCT)]:
        (bin_ / name).write_text(text.format(python=sys.executable))
        (bin_ / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    return state


K4 = """
[experiment]
name = "k4"

[grid]
method = ["lc"]
executor = ["distributed"]
groups = [4]

[settings]
task = "cifar10"
model = "resnet20"
iterations = 2000
batch_size = 128

[launcher]
partition = "gpu"
account = "lab"
qos = "normal"
sbatch = {{ constraint = "h100" }}
setup = ["source {venv}/bin/activate"]
"""


def test_the_slurm_script_of_a_k4_distributed_run_asks_for_what_torchrun_needs(
    tmp_path, fake_slurm, capsys
):
    path, out = spec(tmp_path, K4.format(venv=ROOT / ".venv"), "k4.toml"), tmp_path / "out"
    code, stdout, err = call(["sweep", str(path), "--out", str(out), "--launcher", "slurm"], capsys)
    assert code == 0, err
    (cfg,) = sweep.load_spec(path, out=str(out))
    minutes = plan.time_limit_min(plan.run_seconds(cfg, profiles.load("h100-sxm-nvlink")))
    assert f"submitted job 1001: {cfg.run_id}" in stdout and "--status" in stdout
    lines = (fake_slurm / "job1001.sh").read_text().splitlines()
    sbatch = {
        line.split("=")[0]: line.split("=", 1)[1] for line in lines if line.startswith("#SBATCH")
    }
    folder = out / "k4" / ".submitit" / "%j"
    assert sbatch == {
        "#SBATCH --account": "lab",
        "#SBATCH --constraint": "h100",
        "#SBATCH --error": f"{folder}/%j_0_log.err",
        "#SBATCH --gpus-per-node": "4",  # the run's 4 ranks, one GPU each, on one node
        "#SBATCH --job-name": "submitit",
        "#SBATCH --nodes": "1",
        "#SBATCH --ntasks-per-node": "1",  # one task: it starts torchrun, which starts 4 ranks
        "#SBATCH --open-mode": "append",
        "#SBATCH --output": f"{folder}/%j_0_log.out",
        "#SBATCH --partition": "gpu",
        "#SBATCH --qos": "normal",
        "#SBATCH --signal": "USR2@90",  # submitit requeues on it (time-out, preemption)
        "#SBATCH --time": str(minutes),
        "#SBATCH --wckey": "submitit",
    }
    assert f"source {ROOT / '.venv'}/bin/activate" in lines
    (command,) = [line for line in lines if line.startswith("srun ")]
    assert command.endswith(f"{sys.executable} -u -m submitit.core._submit {folder}")
    assert "export SUBMITIT_EXECUTOR=slurm" in lines


def test_a_run_beyond_one_node_gets_torchrun_on_every_node_from_slurms_environment(tmp_path):
    cfg = RunConfig(
        method="dgl", groups=16, executor="distributed", task="cifar10", model="resnet20"
    ).validated()
    cluster = launchers.Cluster(gpus_per_node=8)
    assert launchers.shape(cfg, cluster) == (2, 8)
    env = SimpleNamespace(num_nodes=2, node=1, hostnames=["gpu-a", "gpu-b"], job_id="4242")
    argv = launchers.torchrun_argv(cfg, Path("/shared/run/job-config.json"), env)
    assert argv[1:] == [
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "8",
        "--node-rank",
        "1",
        "--master-addr",
        "gpu-a",
        "--master-port",
        str(20000 + 4242),
        "--max-restarts",
        "0",
        "-m",
        "bench.executors.distributed",
        "/shared/run/job-config.json",
    ]
    odd = RunConfig(
        method="dgl", groups=9, executor="distributed", task="cifar10", model="resnet20"
    ).validated()
    assert launchers.shape(replace(odd, groups=12), cluster) == (2, 6)
    with pytest.raises(UsageError, match="9 GPUs, which do not split evenly over 2 nodes"):
        launchers.shape(odd, cluster)


def test_a_requeued_job_is_the_same_run(tmp_path):
    cfg = RunConfig(method="lc", task="digits", model="mlp").validated()
    job = launchers.RunJob(cfg)
    again = job.checkpoint()
    assert again.function is job and not again.args and not again.kwargs


def test_a_fake_slurm_runs_the_grid_to_completion(tmp_path, fake_slurm, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")
    path, out = spec(tmp_path), tmp_path / "out"
    code, stdout, err = call(
        [
            "sweep",
            str(path),
            "--out",
            str(out),
            "--launcher",
            "slurm",
            "--partition",
            "cpu",
            "--wait",
        ],
        capsys,
    )
    assert code == 0, (stdout, err)
    assert len(list(fake_slurm.glob("job*.sh"))) == 6
    logs = "".join(  # what each job said, should a run not be done
        f"\n{log.name}: {log.read_text()[-2000:]}"
        for log in sorted((out / "tiny" / ".submitit").glob("*/*_log.*"))
    )
    assert "6 runs: 6 done, 0 running, 0 partial, 0 failed, 0 todo" in stdout, stdout + logs
    exits = [fake_slurm / f"exit{1000 + i}" for i in range(1, 7)]
    deadline = time.monotonic() + 60  # each job's script ends just after its result is saved
    while not all(p.exists() for p in exits) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p.read_text().strip() for p in exits] == ["0"] * 6


def test_no_slurm_here_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    path, out = spec(tmp_path, TINY.replace("seed = [0, 1]", "seed = [0]")), tmp_path / "out"
    code, _, err = call(["sweep", str(path), "--out", str(out), "--launcher", "slurm"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("lcbench: error: --launcher slurm: ") and "srun" in err


def test_plan_check_prices_each_run_on_the_merged_calibration(tmp_path):
    """One round of the plan check on a tiny grid of sequential runs: one leg, calibrated
    at their threads with the link measured on two ranks; each row's forecast, measured time
    and ratio are what the plan and the run's own metrics give."""
    from bench.cluster import plan_check

    path = spec(tmp_path, TINY.replace("seed = [0, 1]", "seed = [0]"))
    out = tmp_path / "check"

    def cfgs_of_round(r):
        return sweep.load_spec(path, out=str(out / f"round-{r}"))

    need = plan_check.calibrations_needed(cfgs_of_round(0))
    assert need["tasks_of"] == {"mlp": "digits"} and need["rules"] == ["dgl", "lc"]
    assert need["sizes"] == [32, 64] and need["held"] == []
    frame = plan_check.check(cfgs_of_round, 1, out, lambda _: None)
    assert (out / "round-0" / "here-mlp.toml").exists() and not (out / "here-rank.toml").exists()
    merged = [profiles.load(str(out / "here.toml"))]
    assert merged[0].device.threads == torch.get_num_threads()
    assert merged[0].link.allreduce is not None
    assert len(frame) == 3 and (frame.rounds == 1).all()
    for cfg, row in zip(cfgs_of_round(0), frame.itertuples()):
        assert row.profile == "here"  # sequential runs: the profile at their threads
        assert row.forecast_train_s == pytest.approx(plan.priced(cfg, merged[0])[0])
        assert row.measured_train_s == pytest.approx(plan.measured_train_seconds(cfg))
        ratio = row.measured_train_s / row.forecast_train_s  # one round: its own profiles
        assert row.measured_over_forecast == pytest.approx(ratio)
        assert row.round_ratios == f"{ratio:.3f}"
        assert row.within == (0.85 <= ratio <= 1.15)


def test_plan_check_pairs_each_round_with_its_own_calibration(tmp_path, monkeypatch):
    """Two rounds whose machine drifted: each round's runs priced on that round's own
    calibration, the ratio the median of the rounds' ratios; the plan's price on the merged
    calibration beside it."""
    from bench.cluster import plan_check

    path = spec(tmp_path, TINY.replace("seed = [0, 1]", "seed = [0]"))
    out = tmp_path / "check"

    def cfgs_of_round(r):
        return sweep.load_spec(path, out=str(out / f"round-{r}"))

    def table(slowdown: float) -> dict:
        return {
            "profile": {"name": "t", "kind": "measured"},
            "device": {
                "memory_bytes": 1e12,
                "achieved_flops": {"fp32": 1e9 / slowdown},
                "overhead_s": 0.0,
                "update_bytes_per_s": 1e9 / slowdown,
                "threads": torch.get_num_threads(),
            },
            "link": {"name": "l", "latency_s": 0.0, "bandwidth_bytes_per_s": 1e9},
        }

    slowdowns = iter([1.0, 2.0])  # round 2 calibrated on a machine twice as slow

    def calibrate_leg(cfgs, threads, link, path):
        return table(next(slowdowns))

    def measured(cfgs):  # and its runs measured twice as slow
        slowdown = 1 + int(Path(cfgs[0].out).name.split("-")[1])
        return {cfg.run_id: 3.0 * slowdown for cfg in cfgs}

    monkeypatch.setattr(plan_check, "calibrate_leg", calibrate_leg)
    monkeypatch.setattr(plan_check, "measured", measured)
    frame = plan_check.check(cfgs_of_round, 2, out, lambda _: None)
    merged = profiles.load(str(out / "here.toml"))
    assert merged.device.flops["fp32"] == pytest.approx(7.5e8)  # the median of 1e9 and 5e8
    assert len(frame) == 3
    for cfg, row in zip(cfgs_of_round(0), frame.itertuples()):
        fast = plan.priced(cfg, profiles.parse(table(1.0), "t"))[0]
        ratios = [3.0 / fast, 6.0 / (2 * fast)]  # alike: the drift paired away
        assert [float(v) for v in row.round_ratios.split()] == pytest.approx(ratios, rel=1e-3)
        assert row.measured_over_forecast == pytest.approx(3.0 / fast)
        assert row.measured_train_s == pytest.approx(4.5)
        assert row.forecast_train_s == pytest.approx(plan.priced(cfg, merged)[0])


def test_plan_check_legs_take_the_ranks_first_then_each_models_sequential_runs():
    """Each leg is calibrated just before its runs: the runs on ranks (their calibration
    measures the link), then one leg per model of the sequential runs, in the grid's order."""
    from bench.cluster import plan_check
    from bench.config import RunConfig

    grid = [
        RunConfig(method="bp", model="small-cnn"),
        RunConfig(method="dgl", model="lstm", task="seq-fashion-mnist"),
        RunConfig(method="bp", model="small-cnn", executor="ddp", workers=2),
        RunConfig(method="lc", model="small-cnn"),
        RunConfig(method="dgl", model="small-cnn", executor="distributed"),
    ]
    got = [(name, [grid.index(c) for c in runs]) for name, runs in plan_check.legs(grid)]
    assert got == [("here-rank", [2, 4]), ("here-small-cnn", [0, 3]), ("here-lstm", [1])]
    assert plan_check.legs(grid[:2]) == [("here-small-cnn", grid[:1]), ("here-lstm", grid[1:2])]
