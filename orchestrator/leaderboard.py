"""The leaderboard of a sweep, read back from MLflow (not from Tune's files).

Reading from the tracking store means ``wrnsweep best`` works from any machine
that can reach the MLflow server, for sweeps run anywhere.
"""

from __future__ import annotations

from typing import Any

COLUMNS = ("rank", "run", "arch", "depth", "width", "dropout", "lr", "milestones", "params",
           "epochs", "status", "best", "test_acc")


def leaderboard(client: Any, plan: Any, *, top: int | None = None) -> list[dict[str, Any]]:
    """Child runs of the sweep's parent run, best first by ``best_<metric>``."""
    from orchestrator.tracking import PARENT_TAG

    runs = client.search_runs(
        [plan.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{plan.parent_run_id}'",
        max_results=5000,
    )
    rows = []
    for run in runs:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        status = run.info.status
        if t.get("wrnsweep.pruned") == "true":
            status = f"PRUNED@{t.get('wrnsweep.stopped_at_epoch', '?')}"
        rows.append({
            "run": run.info.run_name, "run_id": run.info.run_id, "arch": p.get("arch"),
            "depth": p.get("depth"), "width": p.get("width"), "dropout": p.get("dropout"),
            "lr": p.get("lr"), "milestones": p.get("milestones"),
            "params": int(m["num_params"]) if "num_params" in m else None,
            "epochs": int(m["epoch"]) if "epoch" in m else 0, "status": status,
            "best": m.get(f"best_{plan.metric}"), "test_acc": m.get("test_acc"),
        })
    sign = -1.0 if plan.mode == "max" else 1.0
    rows.sort(key=lambda r: (r["best"] is None, sign * (r["best"] or 0.0)))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows[:top] if top else rows


def format_cell(value: Any, digits: int = 4) -> str:
    """A table cell: ``-`` for missing, floats to ``digits`` places, big counts with commas."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """A plain-text table; the ``best`` column is headed with the metric's name."""
    header = [c if c != "best" else f"best {metric}" for c in COLUMNS]
    cells = [[format_cell(row.get(c)) for c in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
