"""The resolved configuration of one run, and its validation."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from dataclasses import asdict, dataclass, field, fields

import methods


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


EXECUTORS = ("sequential", "distributed", "ddp")
#: executors whose ranks are processes started by torchrun
LAUNCHED = ("distributed", "ddp")
PLACEMENTS = ("stage", "neuron")
SPLITS = ("flops", "params", "activations", "time", "paper")
#: fp32 (no TF32), tf32, bf16 autocast with fp32 weights, losses and messages (models.runtime)
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class RunConfig:
    """Everything that determines a run (plus where it is written)."""

    method: str
    groups: int | None = None  # layer groups; default 2 (ddp: 1, the whole net on every rank)
    task: str = "fashion-mnist"
    model: str | None = None
    width: float = 1.0
    epochs: int = 3
    iterations: int | None = None  # total training batches; overrides epochs (last one cut short)
    batch_size: int = 128
    optimizer: str = "sgd"  # of the main network: sgd (Nesterov momentum) or adam
    lr: float = 0.02
    lr_milestones: list[int] | None = None  # iterations at which the main rate is multiplied by
    lr_gamma: float = 0.1  # lr_gamma (Adam-trained local modules keep theirs)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    clip_grad: float | None = None  # gradient-norm clipping, per stage and optimizer
    seed: int = 0
    split: str = "flops"
    cuts: list[int] | None = None
    options: dict = field(default_factory=dict)
    executor: str = "sequential"
    placement: str = "stage"  # distributed GN-DGL: "neuron" puts each neuron group on a rank
    workers: int | None = None  # data-parallel ranks of --executor ddp
    device: str = "auto"
    precision: str = "fp32"  # fp32 (no TF32), tf32, or bf16 autocast (fp32 weights and messages)
    compile: bool = False  # torch.compile each group and local module (compile time apart)
    threads: int | None = (
        None  # per process; default: torch's (sequential), cores / ranks (on ranks)
    )
    limit_train: int | None = None
    limit_test: int | None = None
    eval_batch_size: int | None = None  # default: the task's (1000; a language model: 10)
    save_weights: bool = False  # the trained stages' state dicts to RUN/weights/stageK.pt
    checkpoint_every: int = 1  # epochs between checkpoints (RUN/checkpoints/); 0: none
    rank_timeout: float = 300.0  # seconds a rank waits for a peer before the run fails
    max_restarts: int = 0  # torchrun's elastic agent restarts the ranks from the last checkpoint
    experiment: str = "adhoc"
    out: str = "results"
    data_dir: str | None = None
    tensorboard: str | None = None  # write every row to TensorBoard event files under DIR/RUN_ID

    #: fields that do not change what is computed (where, how it is reported)
    OUTPUT_FIELDS = ("experiment", "out", "data_dir", "tensorboard")
    #: ... nor how often its state is saved: none of them is part of the run's key
    UNKEYED_FIELDS = (*OUTPUT_FIELDS, "checkpoint_every", "rank_timeout", "max_restarts")
    #: fields added after runs were recorded: left out of the key at these defaults, so that
    #: the ids of earlier runs stay the same (and their sweeps resume)
    LATER_FIELDS = {"workers": None, "precision": "fp32", "compile": False, "optimizer": "sgd"}

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
                or ("neuron_groups" in options and self.executor == "distributed"),
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
