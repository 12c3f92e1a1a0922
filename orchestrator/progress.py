"""Terminal progress of a running sweep: one line per epoch result and per trial end.

Each line says how many trials are running and finished and the best score so
far, so a glance at the last line tells the state of the sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray import tune

from trainables.result import EpochResult, better


class ConsoleProgress(tune.Callback):
    def __init__(self, *, metric: str, mode: str, num_samples: int,
                 echo: Callable[[str], None] = print) -> None:
        self.metric = metric
        self.mode = mode
        self.num_samples = num_samples
        self.echo = echo
        self.best: tuple[float, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["echo"] = print  # a click.echo closure need not survive Tuner.restore
        return state

    def _counts(self, trials: list) -> str:
        running = sum(t.status == "RUNNING" for t in trials)
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        return f"[{running} running, {done}/{self.num_samples} done]"

    def _best(self) -> str:
        if self.best is None:
            return ""
        return f" | best {self.metric} {self.best[0]:.4f} ({self.best[1]})"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        value = result.get(self.metric)
        best = None if self.best is None else self.best[0]
        if isinstance(value, int | float) and better(value, best, self.mode):
            self.best = (float(value), trial.trial_id)
        epoch = EpochResult.parse(result)
        score = f"{value:.4f}" if isinstance(value, int | float) else "n/a"
        self.echo(f"{self._counts(trials)} {trial.trial_id} {trial.config.get('arch')} "
                  f"epoch {epoch.epoch}/{epoch.total_epochs} {self.metric} {score}"
                  f"{self._best()}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = EpochResult.parse(trial.last_result or {})
        how = "finished"
        if last.diverged:
            how = "diverged"
        elif last.stopped_early:
            how = f"stopped early at epoch {last.epoch}"
        self.echo(f"{self._counts(trials)} {trial.trial_id} {how}{self._best()}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.echo(f"{self._counts(trials)} {trial.trial_id} FAILED: {failure_line(trial)}")


def failure_line(trial: Any) -> str:
    """The last line of a failed trial's error (``ValueError: boom``), as plain text."""
    lines = str(getattr(trial, "error_msg", "") or "").strip().splitlines()
    return lines[-1].strip() if lines else "no error message"
