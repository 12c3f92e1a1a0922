"""The leaderboard of a sweep, read back from MLflow (not from Tune's files).

Reading from the tracking store means ``wrnsweep best`` works from any machine
that can reach the MLflow server, for sweeps run anywhere.
"""

from __future__ import annotations

from typing import Any

# Columns around the model hyperparameters (which come from the registry).
LEADING = ("rank", "run", "arch")
TRAILING = ("lr", "milestones", "params", "epochs", "status")


def leaderboard(client: Any, manifest: Any, *, top: int | None = None) -> list[dict[str, Any]]:
    """The search's child runs of the sweep's parent run, best first by ``best_<metric>``.

    Each row holds numbers as numbers (MLflow keeps params as strings): a model
    hyperparameter the run's family does not have is absent, not "n/a". The score
    is under its own name, ``best_<metric>`` (e.g. ``best_val_acc``).
    """
    from orchestrator.confirm import ROUND_TAG
    from orchestrator.runmap import status_label
    from orchestrator.store import PARENT_TAG
    from trainables.models.registry import hparam_names

    runs = client.search_runs(
        [manifest.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{manifest.parent_run_id}'",
        max_results=5000,
    )
    score = best_key(manifest.metric)
    rows = []
    for run in runs:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        if ROUND_TAG in t:
            continue  # a confirm run: the search's ranking is of the search's trials
        status = status_label(run.info.status, t)
        row: dict[str, Any] = {"run": run.info.run_name, "run_id": run.info.run_id,
                               "arch": p.get("arch")}
        row.update({n: param_value(p[n]) for n in hparam_names()
                    if param_value(p.get(n)) is not None})
        row.update({
            "lr": param_value(p.get("lr")),
            "milestones": [float(x) for x in p["milestones"].split(",") if x]
            if p.get("milestones") else None,
            "params": int(m["num_params"]) if "num_params" in m else None,
            "epochs": int(m["epoch"]) if "epoch" in m else 0, "status": status,
            score: m.get(score), "test_acc": m.get("test_acc"),
        })
        rows.append(row)
    sign = -1.0 if manifest.mode == "max" else 1.0
    rows.sort(key=lambda r: (r[score] is None, sign * (r[score] or 0.0)))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows[:top] if top else rows


def best_key(metric: str) -> str:
    """The name of a run's best value of ``metric``: the MLflow metric ``best_<metric>``."""
    return f"best_{metric}"


def param_value(text: str | None) -> Any:
    """An MLflow param (always a string) as the value it was: int, float, str; None for n/a."""
    if text is None or text in ("n/a", "None"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def format_cell(value: Any, digits: int = 4) -> str:
    """A table cell: ``-`` if missing, floats to ``digits`` significant digits, big counts
    with commas, lists comma-separated."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    if isinstance(value, list):
        return ",".join(format_cell(v, digits) for v in value)
    return str(value)


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """A plain-text table: the model hyperparameters any row has, the score named by metric."""
    from trainables.models.registry import hparam_names

    hparams = [n for n in hparam_names() if any(n in row for row in rows)]
    columns = [*LEADING, *hparams, *TRAILING, best_key(metric), "test_acc"]
    header = [c if c != best_key(metric) else f"best {metric}" for c in columns]
    cells = [[format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
