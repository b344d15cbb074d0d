"""A drill hook, not a feature: it lets fault tests and drills kill a DecoderWorker at a known point.

VAEGEN_STAGE_DELAY="stage=seconds[,stage=seconds]" (stages: decode, encode, publish) makes every worker of a job
pause on entering those stages. Unset, nothing happens. The driver reads the variable (a joined cluster's workers
do not share its environment) and hands the text to each worker, which parses it when it starts: a value that is
not a number fails the worker, which tests also use to make every worker of a run die."""
from __future__ import annotations

import os
import time
from collections.abc import Callable

STAGE_DELAY_ENV = "VAEGEN_STAGE_DELAY"


def stage_delay_setting() -> str | None:
    """The driver's side: the setting as given, to hand to the workers."""
    return os.environ.get(STAGE_DELAY_ENV) or None


def stage_pause(setting: str | None) -> Callable[[str], None] | None:
    """The worker's side: a function that sleeps on entering the stages the setting names, or None."""
    delays = {}
    for part in filter(None, (setting or "").split(",")):
        stage, _, seconds = part.partition("=")
        delays[stage.strip()] = float(seconds)
    if not delays:
        return None

    def pause(stage: str) -> None:
        if stage in delays:
            time.sleep(delays[stage])
    return pause
