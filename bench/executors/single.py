"""The sequential executor as the one process of a torchrun group, so that torchrun's
elastic agent can start it again (``--max-restarts``): each attempt continues from the
newest checkpoint. Run as ``python -m bench.executors.single CONFIG.json``."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from bench import prepare
from bench.config import RunConfig

from . import launch, sequential


def main(argv: list[str] | None = None) -> None:
    """Run the config here; an error is left in the run folder (``.rank0.error``, read by
    the launcher and by the next attempt) before the process exits with status 1."""
    launch.end_on_sigterm()
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(argv[0]).read_text())
    cfg = RunConfig(**config["config"])
    folder = prepare.run_folder(prepare.resolve(cfg))
    if launch.diverged_before(folder):
        return
    try:
        sequential.run(
            prepare.prepare(cfg, cuts=config.get("cuts")),
            progress=os.environ.get("LCBENCH_PROGRESS") == "1",
            restart=launch.restart_note(folder, 1),
        )
    except BaseException as e:
        launch.leave_error(folder, 0, e)
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
