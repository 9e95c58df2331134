"""Live curves: every row a run records, as it is recorded, in TensorBoard's event files
(``--tensorboard DIR``: one sub-folder per run, ``DIR/RUN_ID``), read by ``tensorboard
--logdir DIR``. A figure of a stage is tagged ``METRIC/stageK``, one of the whole run
``METRIC``; the step is the epoch. When the run ends, its config goes in as hparams beside
its last epoch's whole-run figures. Writing uses torch's ``SummaryWriter``, which needs the
``tensorboard`` package (``pip install 'lcbench[tensorboard]'``)."""

from __future__ import annotations

import json
from pathlib import Path


def tag(stage: str, metric: str) -> str:
    return f"{metric}/stage{stage}" if stage else metric


def hparams(config: dict) -> dict:
    """A run's config as TensorBoard hparams: numbers, strings and booleans; a rule option
    as ``options.NAME``; anything else (a list, None) as its JSON text."""
    flat = {k: v for k, v in config.items() if k != "options"}
    flat.update({f"options.{k}": v for k, v in (config.get("options") or {}).items()})
    return {
        k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
        for k, v in sorted(flat.items())
    }


class Curves:
    """One run's event files; ``resumed_epoch``: events of later epochs an earlier attempt
    wrote are discarded (they are recorded again)."""

    def __init__(self, folder: str, run_id: str, config: dict, resumed_epoch: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.config = config
        self.writer = SummaryWriter(
            log_dir=str(Path(folder) / run_id), purge_step=resumed_epoch + 1
        )
        self.last: dict[str, float] = {}

    def add(self, epoch: int, metrics: dict[tuple[str, str], float]) -> None:
        for (stage, metric), value in metrics.items():
            self.writer.add_scalar(tag(stage, metric), value, epoch)
            if not stage:
                self.last[metric] = value
        self.writer.flush()

    def close(self) -> None:
        """The config as hparams beside the last epoch's whole-run figures; the files closed."""
        metrics = {f"hparam/{k}": v for k, v in self.last.items()}
        self.writer.add_hparams(hparams(self.config), metrics, run_name=".")
        self.writer.close()
