"""The resolved configuration of one run, and its validation."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from dataclasses import asdict, dataclass, field, fields

import methods
from methods.base import TrainOptions


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


EXECUTORS = ("sequential", "distributed", "ddp")
#: executors whose ranks are processes started by torchrun
LAUNCHED = ("distributed", "ddp")
PLACEMENTS = ("stage", "neuron")
SPLITS = ("flops", "params", "activations", "time", "paper")
#: fp32 (no TF32), tf32, bf16 autocast with fp32 weights, losses and messages (models.runtime)
PRECISIONS = ("fp32", "tf32", "bf16")
#: the main network's learning-rate schedules (bench.schedule)
SCHEDULES = ("step", "cosine")


def arg(default, help: str, **cli):
    """A run setting: its default (written here once), the help of its `lcbench run` option
    and how the option is spelled (``short``, ``metavar``, ``choices``, ``envvar``)."""
    if default is ...:
        return field(metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class RunConfig:
    """Everything that determines a run (plus where it is written)."""

    method: str = arg(..., "Learning rule (see `lcbench list`).", short="-m")
    groups: int | None = arg(
        None,
        "Number of layer groups K (LC with K groups has K-1 critics)  [default: 2; ddp: 1]",
        short="-k",
    )
    task: str = arg("fashion-mnist", "Task (see `lcbench list`).", short="-t")
    model: str | None = arg(None, "Model (default: the task's). See `lcbench list`.")
    width: float = arg(1.0, "Width multiplier.")
    epochs: int = arg(3, "Training epochs.", short="-e")
    iterations: int | None = arg(
        None, "Total training batches (overrides --epochs; the last epoch is cut short)."
    )
    batch_size: int = arg(128, "Global batch size.", short="-b")
    optimizer: str = arg(
        TrainOptions.optimizer,
        "Optimizer of the main network: SGD with Nesterov momentum, or Adam (the DGL "
        "authors' DNI comparison). Critics and synthesizers keep their Adam.",
        choices=methods.base.OPTIMIZERS,
    )
    lr: float = arg(TrainOptions.lr, "Learning rate of the main network.")
    lr_milestones: list[int] | None = arg(
        None, "Iterations at which the main network's rate is multiplied by --lr-gamma."
    )
    lr_gamma: float = arg(
        0.1, "Factor of the rate at each milestone (Adam-trained local modules keep theirs)."
    )
    lr_schedule: str = arg(
        "step",
        "The main network's rate: step decay at --lr-milestones, or a cosine over the epochs "
        "(InfoPro's --cos_lr), after --lr-warmup epochs that blend from --lr-warmup-start.",
        choices=SCHEDULES,
    )
    lr_warmup: int = arg(0, "Epochs of the cosine schedule's linear warm-up.")
    lr_warmup_start: float = arg(0.01, "The rate the cosine schedule's warm-up starts from.")
    momentum: float = arg(TrainOptions.momentum, "SGD's momentum (the main network).")
    nesterov: bool = arg(TrainOptions.nesterov, "Nesterov momentum (SGD).")
    weight_decay: float = arg(TrainOptions.weight_decay, "Weight decay of the main network.")
    clip_grad: float | None = arg(
        None, "Clip the gradient norm of each module (a group, a local module) to this value."
    )
    seed: int = arg(0, "Seed of the weights, the batches and the augmentation.", short="-s")
    split: str = arg(
        "flops",
        "Balance the layer groups by flops, params, activations or measured time "
        "(local modules included), or take the model's published cut points: paper.",
    )
    cuts: list[int] | None = arg(None, "Explicit cut points, e.g. 3,7 (overrides --split).")
    options: dict = field(default_factory=dict, metadata={"cli": False})  # -o KEY=VALUE
    executor: str = arg(
        "sequential",
        "sequential (one process, reference semantics), distributed (one process per stage "
        "on torch.distributed, started with torchrun) or ddp (--method bp only: data-parallel "
        "BP, the whole net on each of --workers ranks with DistributedDataParallel, each on "
        "its slice of the global --batch-size).",
    )
    placement: str = arg(
        "stage",
        "distributed GN-DGL: stage (one rank per layer group) or neuron (one rank per neuron "
        "group of each layer group: K x G ranks).",
    )
    workers: int | None = arg(
        None, "ddp: the data-parallel ranks K (--batch-size must divide by K)."
    )
    device: str = arg("auto", "auto, cpu, cuda or cuda:N.")
    precision: str = arg(
        "fp32",
        "fp32 (no TF32: the papers' semantics), tf32 (TF32 matmuls and convolutions on CUDA) "
        "or bf16 (autocast; fp32 weights, losses and messages between stages). Conv nets run "
        "channels-last whatever the precision.",
    )
    compile: bool = arg(
        False,
        "torch.compile each layer group and local module (with CUDA graphs where the executor "
        "and rule allow); the compile time is recorded apart (compile_time_s), not in "
        "epoch_time_s.",
    )
    threads: int | None = arg(
        None, "CPU threads per process (default: torch's; distributed, ddp: cores / ranks)."
    )
    limit_train: int | None = arg(None, "Use only the first N training samples.")
    limit_test: int | None = arg(None, "Use only the first N test samples.")
    eval_batch_size: int | None = arg(
        None, "Test batch size (default: the task's: 1000; a language model's: 10)."
    )
    save_weights: bool = arg(
        False, "Also write the trained stages' state dicts to RUN/weights/stageK.pt."
    )
    checkpoint_every: int = arg(
        1,
        "Write a checkpoint (RUN/checkpoints/) every N epochs (0: none); the same command run "
        "again continues from the last one. Removed when the run ends ok.",
        metavar="N",
    )
    rank_timeout: float = arg(
        300.0,
        "distributed, ddp: how long a rank waits for a peer (a message, a collective) before "
        "the run fails naming the rank that stopped answering.",
        metavar="SECONDS",
    )
    max_restarts: int = arg(
        0,
        "When a rank (or the one process of a sequential run) dies or stops answering, "
        "torchrun's elastic agent starts the ranks again from the newest checkpoint, up to N "
        "times; run.json lists each restart.",
        metavar="N",
    )
    experiment: str = arg("adhoc", "Experiment name: the run goes to OUT/EXPERIMENT/RUN_ID/.")
    out: str = arg("results", "Results folder.")
    data_dir: str | None = arg(
        None, "Where data sets are looked for first [env LCBENCH_DATA].", envvar="LCBENCH_DATA"
    )
    tensorboard: str | None = arg(
        None,
        "Also write every row, as it is measured, to TensorBoard event files under "
        "DIR/RUN_ID (per stage where it has one; the config as hparams at the end); needs "
        "`pip install 'lcbench[tensorboard]'`.",
        metavar="DIR",
    )

    #: fields that do not change what is computed (where, how it is reported)
    OUTPUT_FIELDS = ("experiment", "out", "data_dir", "tensorboard")
    #: ... nor how often its state is saved: none of them is part of the run's key
    UNKEYED_FIELDS = (*OUTPUT_FIELDS, "checkpoint_every", "rank_timeout", "max_restarts")
    #: fields added after runs were recorded: left out of the key at these defaults, so that
    #: the ids of earlier runs stay the same (and their sweeps resume)
    LATER_FIELDS = {
        "workers": None,
        "precision": "fp32",
        "compile": False,
        "optimizer": "sgd",
        "lr_schedule": "step",
        "lr_warmup": 0,
        "lr_warmup_start": 0.01,
    }

    def validated(self) -> RunConfig:
        """Canonical method name and option defaults filled in; raise UsageError on bad values."""
        try:
            method = methods.resolve(self.method)
            options = {**methods.option_defaults(method.name), **self.options}
            methods.base.options_from(method.options, options, method.name)
        except ValueError as e:
            raise UsageError(str(e)) from None
        ddp = self.executor == "ddp"
        groups = self.groups if self.groups is not None else 1 if ddp else 2
        checks = [
            (groups >= 1, f"--groups must be at least 1 (got {groups})"),
            (self.epochs >= 0, f"--epochs must not be negative (got {self.epochs})"),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (self.lr > 0, f"--lr must be positive (got {self.lr})"),
            (
                self.optimizer in methods.base.OPTIMIZERS,
                f"unknown optimizer '{self.optimizer}' "
                f"(choose from {', '.join(methods.base.OPTIMIZERS)})",
            ),
            (
                self.iterations is None or self.iterations >= 1,
                f"--iterations must be at least 1 (got {self.iterations})",
            ),
            (
                self.clip_grad is None or self.clip_grad > 0,
                f"--clip-grad must be positive (got {self.clip_grad})",
            ),
            (0 < self.lr_gamma, f"lr_gamma must be positive (got {self.lr_gamma})"),
            (
                self.lr_schedule in SCHEDULES,
                f"unknown --lr-schedule '{self.lr_schedule}' (choose from {', '.join(SCHEDULES)})",
            ),
            (
                self.lr_schedule == "step" or not self.lr_milestones,
                "--lr-milestones belong to the step schedule, not to --lr-schedule cosine",
            ),
            (self.lr_warmup >= 0, f"--lr-warmup must not be negative (got {self.lr_warmup})"),
            (
                self.lr_warmup == 0 or self.lr_schedule == "cosine",
                "--lr-warmup belongs to --lr-schedule cosine",
            ),
            (
                self.lr_warmup_start >= 0,
                f"--lr-warmup-start must not be negative (got {self.lr_warmup_start})",
            ),
            (self.width > 0, f"--width must be positive (got {self.width})"),
            (
                self.checkpoint_every >= 0,
                f"--checkpoint-every must not be negative (got {self.checkpoint_every})",
            ),
            (
                math.isfinite(self.rank_timeout) and self.rank_timeout > 0,
                f"--rank-timeout must be a positive number of seconds (got {self.rank_timeout})",
            ),
            (
                self.tensorboard is None or importlib.util.find_spec("tensorboard") is not None,
                "--tensorboard needs the tensorboard package: pip install 'lcbench[tensorboard]'",
            ),
            (
                isinstance(self.max_restarts, int) and self.max_restarts >= 0,
                f"--max-restarts must not be negative (got {self.max_restarts})",
            ),
            (
                self.threads is None or self.threads >= 1,
                f"--threads must be at least 1 (got {self.threads})",
            ),
            (
                self.split in SPLITS,
                f"unknown split '{self.split}' (choose from {', '.join(SPLITS)})",
            ),
            (
                self.executor in EXECUTORS,
                f"unknown executor '{self.executor}' (choose from {', '.join(EXECUTORS)})",
            ),
            (
                self.device in ("auto", "cpu") or self.device.startswith("cuda"),
                f"unknown device '{self.device}' (auto, cpu, cuda, cuda:N)",
            ),
            (
                self.precision in PRECISIONS,
                f"unknown precision '{self.precision}' (choose from {', '.join(PRECISIONS)})",
            ),
            (
                self.placement in PLACEMENTS,
                f"unknown placement '{self.placement}' (choose from {', '.join(PLACEMENTS)})",
            ),
            (
                self.placement == "stage"
                or (method.neuron_grouped and self.executor == "distributed"),
                "--placement neuron needs a rule of neuron groups (--method gn) and "
                "--executor distributed",
            ),
            (
                not ddp or method.timing == "one",
                f"--executor ddp trains BP (data-parallel backprop), not --method {method.name}",
            ),
            (
                not ddp or groups == 1,
                f"--executor ddp puts the whole net on every rank: --groups must be 1 (got {groups})",
            ),
            (not ddp or self.workers is not None, "--executor ddp needs --workers K (its ranks)"),
            (
                ddp or self.workers is None,
                "--workers is for --executor ddp (the distributed executor has a rank per layer group)",
            ),
            (
                self.workers is None or self.workers >= 1,
                f"--workers must be at least 1 (got {self.workers})",
            ),
            (
                options.get("microbatches", 1) <= self.batch_size,
                f"-o microbatches={options.get('microbatches')} cuts a batch of {self.batch_size} "
                f"into more micro-batches than it has samples",
            ),
            (
                not ddp or not self.workers or self.batch_size % self.workers == 0,
                f"--batch-size {self.batch_size} does not split into {self.workers} equal shards "
                f"(--workers {self.workers})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        values = asdict(self)
        values.update(method=method.name, groups=groups, options=options)
        return RunConfig(**values)

    def key(self) -> dict:
        """The fields that determine the results (where they go, how often they are saved,
        and later fields at their defaults excluded)."""
        return {
            k: v
            for k, v in asdict(self).items()
            if k not in self.UNKEYED_FIELDS
            and not (k in self.LATER_FIELDS and v == self.LATER_FIELDS[k])
        }

    @property
    def run_id(self) -> str:
        """Readable and unique: method, task, model, K, seed and a hash of the whole key."""
        digest = hashlib.sha1(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.method}-{self.task}-{self.model}-k{self.groups}-s{self.seed}-{digest}"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def ranks(cfg: RunConfig) -> int:
    """Processes of a run: one (sequential), one per layer group (distributed; per neuron
    group with ``--placement neuron``), ``--workers`` (ddp)."""
    if cfg.executor == "ddp":
        return cfg.workers
    return cfg.groups * ranks_per_layer(cfg) if cfg.executor == "distributed" else 1


def ranks_per_layer(cfg: RunConfig) -> int:
    """G ranks per layer group where neuron groups are placed on ranks of their own, else 1."""
    return cfg.options["neuron_groups"] if cfg.placement == "neuron" else 1
