"""From a sweep to a result one can publish: the search's best configurations, over seeds.

A search ends with one run per configuration, and the best of many noisy runs is
an optimistic estimate. ``wrnsweep confirm DIR --top K --seeds N`` trains each of
the search's K best configurations (ranked by its validation metric, never by
test) again from scratch with N new seeds, and reports per configuration the
mean, standard deviation (n - 1 in the denominator), median, min and max of its
test accuracy and error (and of its best validation accuracy when one is kept),
beside the paper's reported error for the same configuration where the
architecture's paper rows have one. The papers this project reproduces report
such figures (the ResNet paper: ResNet-110 "6.43 (6.61 +/- 0.16)" over 5 runs;
the WRN and DiracNet papers: medians).

How it runs: one more round in the sweep folder (``confirm-N``), a Ray Tune
experiment of K x N trials with the sweep's resources and packing, FIFO (no
trial is stopped early: every seed counts), resumable like a sweep
(``wrnsweep resume DIR``). Seeds change initialisation, data order,
augmentation and dropout (``TrainConfig.seed``) and nothing else: the 45k/5k
split is fixed (``trainables.data.SPLIT_SEED``). The seeds are
``search.seed + 1 ... search.seed + N``, none the search's own.

- ``train`` (default): the 45k/5k split; each run reports validation every
  epoch and test once at the end.
- ``train+val``: all 50k training images, as the papers train; there is no
  validation metric, so nothing is chosen by it: the champion is the
  configuration the search ranked first.

Tracking: each run is a child of the sweep's parent run, tagged with its
configuration (``wrnsweep.confirm``: c1 = the search's best), its seed and the
round; the parent gets metrics ``confirm/<round>/<c>/<metric>_<stat>`` and the
whole table as JSON in the tag ``wrnsweep.confirm.summary`` (what ``best`` and
``report`` show). The champion: the configuration with the best mean
validation accuracy (train+val: the search's first), and of its seeds the one
whose selection metric (best validation accuracy; train+val: final training
loss) is closest to that configuration's median; registered as a new version
of the sweep's model with the statistics in its tags, and given the
``champion`` alias.

The pure parts (statistics, choice, the table) import neither Ray nor MLflow;
``best`` prints the table without them.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Tags on each confirm run (config keys with the "wrnsweep." prefix become tags:
# tracking.config_tags); the parent run's summary.
CONFIRM_TAG = "wrnsweep.confirm"  # the configuration: c1, c2, ... (search rank)
SEED_TAG = "wrnsweep.confirm_seed"
ROUND_TAG = "wrnsweep.confirm_round"  # confirm-1, confirm-2, ...
SOURCE_TAG = "wrnsweep.confirm_source"  # the search run the configuration came from
SUMMARY_TAG = "wrnsweep.confirm.summary"
TRAIN_ON = ("train", "train+val")
SELECTION = {"train": ("best_val_acc", "max"), "train+val": ("train_loss", "min")}


class ConfirmInputError(ValueError):
    """Bad confirm settings (exit code 2)."""


@dataclass(frozen=True)
class ConfirmSpec:
    """What to confirm: the search's ``top`` configurations, ``seeds`` runs each."""

    top: int = 3
    seeds: int = 5
    epochs: int | None = None  # None: each configuration's own
    train_on: str = "train"

    def check(self) -> None:
        """Raise :class:`ConfirmInputError` naming the option."""
        if self.top < 1:
            raise ConfirmInputError(f"--top must be >= 1, got {self.top}")
        if self.seeds < 1:
            raise ConfirmInputError(f"--seeds must be >= 1, got {self.seeds}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfirmInputError(f"--epochs must be >= 1, got {self.epochs}")
        if self.train_on not in TRAIN_ON:
            raise ConfirmInputError(f"--train-on must be train or train+val, got "
                                    f"{self.train_on!r} (test data is never trained on)")


@dataclass(frozen=True)
class Chosen:
    """One configuration to confirm: the search run it came from and its Tune config."""

    label: str  # c1, c2, ...: the search's rank
    run_id: str
    score: float  # the search's best validation value of that run
    config: dict[str, Any]  # flat trial config, without the seed


def seeds_for(search_seed: int, n: int) -> list[int]:
    """The confirm seeds: never the search's own (its runs are not re-counted)."""
    return [search_seed + 1 + i for i in range(n)]


def describe(values: Sequence[float]) -> dict[str, float]:
    """n, mean, sample standard deviation (n - 1; 0 for one value), median, min, max."""
    data = [float(v) for v in values]
    if not data:
        return {"n": 0}
    return {"n": len(data), "mean": statistics.fmean(data),
            "std": statistics.stdev(data) if len(data) > 1 else 0.0,
            "median": statistics.median(data), "min": min(data), "max": max(data)}


def summarize(label: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's statistics from its runs' final numbers.

    Each run: ``{"seed", "test_acc", "best_val_acc" (None with train+val), ...}``.
    Test error is in %, as the papers give it.
    """
    tests = [r["test_acc"] for r in runs if r.get("test_acc") is not None]
    out: dict[str, Any] = {
        "label": label, "seeds": sorted(r["seed"] for r in runs),
        "test_acc": describe(tests),
        "test_error": describe([100.0 * (1.0 - t) for t in tests]),
    }
    vals = [r["best_val_acc"] for r in runs if r.get("best_val_acc") is not None]
    if vals:
        out["val_acc"] = describe(vals)
    return out


def champion_config(summaries: Sequence[dict[str, Any]], train_on: str) -> str:
    """The label of the configuration to register: best mean validation accuracy;
    with train+val (no validation) the search's first. Ties go to the search's rank."""
    if train_on == "train+val":
        return summaries[0]["label"]
    scored = [s for s in summaries if s.get("val_acc", {}).get("n")]
    if not scored:
        return summaries[0]["label"]
    return max(scored, key=lambda s: s["val_acc"]["mean"])["label"]


def median_seed(runs: Sequence[dict[str, Any]], train_on: str) -> dict[str, Any]:
    """The run whose selection metric is closest to the median of its configuration
    (best validation accuracy; train+val: final training loss); ties: the lower seed."""
    key, _ = SELECTION[train_on]
    values = [r for r in runs if r.get(key) is not None]
    if not values:
        raise ValueError(f"no run has {key}")
    middle = statistics.median(r[key] for r in values)
    return min(values, key=lambda r: (abs(r[key] - middle), r["seed"]))


def paper_error(config: dict[str, Any], dataset: str) -> dict[str, Any] | None:
    """The paper's reported test error (%) for this very configuration, if a row has it."""
    from trainables.models.registry import get_family

    family = get_family(config["arch"])
    mine = family.resolve({k: config[k] for k in family.hparam_names if k in config})
    for row in family.rows:
        if dataset in row.error and family.resolve(dict(row.hparams)) == mine:
            return {"label": row.label, "error": row.error[dataset], "source": row.source}
    return None


# -- the table (best, report) ------------------------------------------------------------
def read_summary(tags: dict[str, str]) -> dict[str, Any] | None:
    """The confirm summary a parent run holds (None: never confirmed)."""
    text = tags.get(SUMMARY_TAG)
    return json.loads(text) if text else None


def _pm(stats: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    if not stats.get("n"):
        return "-"
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def table_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """One row of text per configuration: what ``best`` and ``report`` show."""
    rows = []
    for c in summary["configs"]:
        hparams = ", ".join(f"{k}={v}" for k, v in c["hparams"].items())
        paper = c.get("paper")
        err = c["test_error"]
        rows.append({
            "config": c["label"] + (" *" if c["label"] == summary.get("champion") else ""),
            "arch": f"{c['arch']} ({hparams})",
            "lr": f"{c['lr']:.4g}" if isinstance(c.get("lr"), int | float) else "-",
            f"search {summary['metric']}": f"{c['search_score']:.4f}",
            "val_acc %": _pm(c.get("val_acc", {}), 100.0),
            "test_error %": _pm(err),
            "median %": f"{err['median']:.2f}" if err.get("n") else "-",
            "min-max %": f"{err['min']:.2f}-{err['max']:.2f}" if err.get("n") else "-",
            "N": str(err.get("n", 0)),
            "paper %": f"{paper['error']:g} ({paper['label']})" if paper else "-",
        })
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    """The confirm table as plain text, with what it was computed from."""
    rows = table_rows(summary)
    header = list(rows[0]) if rows else []
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in header]
    lines = [f"confirmed ({summary['round']}): top {len(rows)} configurations of the search, "
             f"{summary['seeds']} seeds each, {summary['epochs_text']}, trained on "
             f"{summary['train_on']}; mean ± std (n - 1), * = champion"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    lines += ["  ".join(r[h].ljust(w) for h, w in zip(header, widths, strict=True))
              for r in rows]
    if summary["train_on"] == "train+val":
        lines.append("trained on train+val: no validation metric exists; the champion is "
                     "the search's best configuration")
    return "\n".join(lines)


def leaderboard_rows_with(rows: list[dict[str, Any]], summary: dict[str, Any] | None
                          ) -> list[dict[str, Any]]:
    """``best --json``: each confirmed configuration's row gains its ``confirm`` entry."""
    if not summary:
        return rows
    by_run = {c["source_run"]: c for c in summary["configs"]}
    for row in rows:
        c = by_run.get(row.get("run_id"))
        if c is not None:
            row["confirm"] = {
                "round": summary["round"], "config": c["label"],
                "champion": c["label"] == summary["champion"],
                "train_on": summary["train_on"],
                **{k: c[k] for k in ("test_acc", "test_error", "val_acc", "paper", "seeds",
                                     "test_acc_by_seed") if k in c}}
    return rows


def parent_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary as MLflow metrics of the parent run: confirm/<round>/<c>/<m>_<stat>."""
    out: dict[str, float] = {}
    for c in summary["configs"]:
        for metric in ("test_acc", "test_error", "val_acc"):
            for stat, value in c.get(metric, {}).items():
                out[f"confirm/{summary['round']}/{c['label']}/{metric}_{stat}"] = float(value)
    return out


def state_of(spec: ConfirmSpec, round_name: str, chosen: Sequence[Chosen],
             seeds: Sequence[int]) -> dict[str, Any]:
    """What the sweep folder records of a confirm round (``wrnsweep.json``)."""
    return {"round": round_name, "top": spec.top, "seeds": list(seeds),
            "epochs": spec.epochs, "train_on": spec.train_on,
            "configs": [asdict(c) for c in chosen], "done": False}


def jobs(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The Tune configs of a confirm round: every configuration with every seed."""
    out = []
    for c in state["configs"]:
        for seed in state["seeds"]:
            job = {**c["config"], "seed": seed, "train_on": state["train_on"],
                   CONFIRM_TAG: c["label"], SEED_TAG: seed, ROUND_TAG: state["round"],
                   SOURCE_TAG: c["run_id"]}
            if state["epochs"]:
                job["epochs"] = state["epochs"]
            out.append(job)
    return out


def finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None
