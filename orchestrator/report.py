"""``wrnsweep report``: one self-contained HTML page about a sweep, from MLflow.

Everything is read back from the tracking store (like ``wrnsweep best``), so a
report can be made on any machine that reaches the MLflow server, for a sweep
run anywhere. The page holds:

* the leaderboard, with GPU-hours per trial;
* learning curves (``val_acc`` per epoch, the best trials highlighted);
* validation accuracy against parameter count, with the Pareto front and, for
  CIFAR-10/100 sweeps, the papers' reference points;
* per-architecture parallel coordinates of the searched hyperparameters;
* hyperparameter importances (Optuna's fANOVA) per architecture.

Figures are PNG files beside ``report.html`` and embedded in it as base64, so
the page needs nothing else (no JS, no external CSS, no network); ``report.json`` holds
the numbers behind the figures. All of it is also logged to the sweep's parent
run under ``report/``.

GPU-hours of a trial = its run's wall time (MLflow ``end_time - start_time``,
up to now for a run still RUNNING) x the GPUs the trial held, read from the
child run's tag ``wrnsweep.gpu`` (a float, e.g. ``0.5`` for a half-GPU share).
A run without that tag ran on CPUs only and counts 0 GPU-hours.

matplotlib, Optuna and MLflow are imported inside the functions that use
them, so importing this module (``wrnsweep --help``) stays fast.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.store import GPU_TAG
from trainables.models.registry import families, get_family, paper_rows

HTML_FILE = "report.html"
DATA_FILE = "report.json"
ARTIFACT_DIR = "report"  # folder of the parent run's artifacts
MIN_TRIALS = 2  # finished trials an architecture needs for an importance study
FEW_TRIALS = 10  # below this, importances are flagged as indicative only
HIGHLIGHT = 3  # best trials drawn bold and named in the learning curves
DPI = 110

# Numeric run params that can be hyperparameters: every registered family's int and
# float hyperparameters, then the training ones; "seed" is left out on purpose: it
# is not one, and a per-trial seed would look important.
_NUMERIC_TRAINING = ("lr", "momentum", "weight_decay", "gamma", "batch_size", "epochs",
                     "warmup_epochs", "label_smoothing")
_INT_TRAINING = {"batch_size", "epochs", "warmup_epochs"}


def _model_numeric(kinds: tuple[type, ...]) -> list[str]:
    seen = {h.name: None for f in families() for h in f.hparams if h.kind in kinds}
    return list(seen)


NUMERIC_PARAMS = (*_model_numeric((int, float)), *_NUMERIC_TRAINING)
INT_PARAMS = {*_model_numeric((int,)), *_INT_TRAINING}


# -- paper reference points ----------------------------------------------------------------
# The published results are the registry's paper rows (trainables.models.families):
# label, arch, configuration, parameter count of our zoo, reported error per dataset.
PAPER_POINTS = tuple(row for row in paper_rows() if row.error)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}  # the datasets papers report on


# -- what the report is made of ------------------------------------------------------------
@dataclass
class Trial:
    """One child run of the sweep, as the report needs it."""

    rank: int
    run_id: str
    name: str
    arch: str
    status: str  # FINISHED, FAILED, KILLED, PRUNED@<epoch>, RUNNING
    params: dict[str, str]
    num_params: int | None
    val_acc: float | None  # best val_acc over the epochs
    test_acc: float | None
    gpus: float
    hours: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val_acc)

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.hours

    @property
    def finished(self) -> bool:
        """Ran every epoch: the only trials whose score is comparable in a study."""
        return self.status == "FINISHED"


@dataclass
class Importance:
    """Importances of one architecture's hyperparameters, or why there are none."""

    arch: str
    trials: int  # finished trials used
    values: dict[str, float] | None
    note: str = ""


@dataclass
class ReportResult:
    """What ``write_report`` wrote: the page, the numbers behind it, the PNGs."""

    html: Path
    data: Path
    figures: list[Path]
    artifacts_logged: bool


# -- reading MLflow -------------------------------------------------------------------------
def gpu_share(tags: dict[str, str]) -> float:
    """GPUs the trial held, from the ``wrnsweep.gpu`` tag; 0 without it (a CPU trial)."""
    try:
        value = float(tags.get(GPU_TAG, 0.0))
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def run_hours(start_ms: int | None, end_ms: int | None, *, now_ms: int | None = None) -> float:
    """Wall time of a run in hours; a run still RUNNING counts up to now."""
    if not start_ms:
        return 0.0
    end = end_ms or now_ms or int(time.time() * 1000)
    return max(0, end - start_ms) / 3.6e6


def collect_trials(client: Any, manifest: Any) -> list[Trial]:
    """The sweep's child runs in ``wrnsweep best`` order, with their val_acc curves."""
    from orchestrator.leaderboard import leaderboard
    from orchestrator.store import PARENT_TAG

    rows = leaderboard(client, manifest)
    runs = {r.info.run_id: r for r in client.search_runs(
        [manifest.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{manifest.parent_run_id}'",
        max_results=5000)}
    trials = []
    for row in rows:
        run = runs.get(row["run_id"])
        if run is None:
            continue
        history = client.get_metric_history(run.info.run_id, "val_acc")
        by_epoch = {int(m.step): float(m.value) for m in history}
        curve = sorted(by_epoch.items())
        finite = [v for _, v in curve if math.isfinite(v)]
        trials.append(Trial(
            rank=row["rank"], run_id=run.info.run_id, name=run.info.run_name,
            arch=str(run.data.params.get("arch", "?")), status=row["status"],
            params=dict(run.data.params), num_params=row["params"],
            val_acc=max(finite) if finite else None, test_acc=row["test_acc"],
            gpus=gpu_share(run.data.tags),
            hours=run_hours(run.info.start_time, run.info.end_time), curve=curve,
        ))
    return trials


def sweep_dataset(client: Any, manifest: Any, trials: Sequence[Trial]) -> str | None:
    """The dataset name: from the trials' params, else the parent run (its params, or
    the ``resolved_config.json`` artifact every sweep logs at launch)."""
    names = {t.params.get("dataset") for t in trials} - {None}
    if len(names) == 1:
        return names.pop()
    try:
        parent = client.get_run(manifest.parent_run_id)
        if parent.data.params.get("dataset"):
            return parent.data.params["dataset"]
        with tempfile.TemporaryDirectory() as folder:
            path = client.download_artifacts(manifest.parent_run_id, "resolved_config.json", folder)
            config = json.loads(Path(path).read_text())
    except Exception:  # no artifact (an old sweep) or an unreachable artifact store
        return None
    dataset = config.get("dataset")
    return dataset.get("name") if isinstance(dataset, dict) else dataset


# -- pure computations ----------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (params, accuracy) points no other point dominates, fewest params first.

    A point is dominated when another has no more parameters and no lower
    accuracy, and is strictly better in one of the two; equal points do not
    dominate each other, so both stay. One pass over the points sorted by
    parameters (O(n log n)): a point is on the front when it is the most accurate
    of its parameter count and beats every smaller model.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best_smaller = -math.inf  # best accuracy of the models with fewer parameters
    for _, group in itertools.groupby(order, key=lambda i: points[i][0]):
        same_size = list(group)
        top = points[same_size[0]][1]
        if top > best_smaller:
            front += [i for i in same_size if points[i][1] == top]
            best_smaller = top
    return front


def numeric_params(params: dict[str, str]) -> dict[str, float]:
    """Run params as numbers; milestones become ``milestone_1``, ``milestone_2``, ...

    Values an architecture does not have ("n/a"), booleans and strings
    (shortcut, variant) are left out: only numbers have an axis.
    """
    out: dict[str, float] = {}
    for name in NUMERIC_PARAMS:
        try:
            value = float(params[name])
        except (KeyError, ValueError):
            continue
        if math.isfinite(value):
            out[name] = value
    try:
        marks = [float(m) for m in params.get("milestones", "").split(",") if m.strip()]
    except ValueError:
        marks = []
    for i, mark in enumerate(marks, start=1):
        out[f"milestone_{i}"] = mark
    return out


def varying_params(rows: Sequence[dict[str, float]]) -> tuple[list[str], list[str]]:
    """(names with at least two values across every row, names with one value)."""
    names = [n for n in rows[0] if all(n in r for r in rows)] if rows else []
    varying = [n for n in names if len({r[n] for r in rows}) > 1]
    return varying, [n for n in names if n not in varying]


def is_log_scale(values: Iterable[float]) -> bool:
    """Positive values spanning 10x or more (a learning rate): a log axis and distribution."""
    values = list(values)
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 10


def infer_distributions(rows: Sequence[dict[str, float]], names: Sequence[str]) -> dict[str, Any]:
    """Optuna distributions spanning the observed values of each parameter.

    The sweep's own space is not needed: fANOVA only looks at where the trials
    are. Integers stay integers (depth, width); floats spanning 10x are log.
    """
    from optuna.distributions import FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name in names:
        values = [r[name] for r in rows]
        low, high = min(values), max(values)
        if name in INT_PARAMS and all(v.is_integer() for v in values):
            out[name] = IntDistribution(int(low), int(high))
        else:
            out[name] = FloatDistribution(low, high, log=is_log_scale(values))
    return out


def arch_importance(arch: str, trials: Sequence[Trial], *, seed: int = 0) -> Importance:
    """fANOVA importances of one architecture's hyperparameters for best val_acc.

    The study is rebuilt in memory from the finished trials (a trial stopped
    early has a truncated score); each yields ``create_trial`` with the numeric
    params that vary. Too few trials, nothing varying or identical scores give
    a note instead of numbers, and so does any error of the evaluator: the
    report never fails on this section.
    """
    done = [t for t in trials if t.arch == arch and t.finished and t.val_acc is not None]
    skipped = sum(1 for t in trials if t.arch == arch) - len(done)
    extra = f"; {skipped} trial(s) not finished left out" if skipped else ""
    if len(done) < MIN_TRIALS:
        return Importance(arch, len(done), None, f"{len(done)} finished trial(s), at least "
                          f"{MIN_TRIALS} are needed for an importance study{extra}")
    rows = [numeric_params(t.params) for t in done]
    varying, constant = varying_params(rows)
    if not varying:
        return Importance(arch, len(done), None, "every finished trial has the same numeric "
                          f"hyperparameters ({', '.join(constant) or 'none'}){extra}")
    scores = [t.val_acc for t in done]
    if len(set(scores)) == 1:
        return Importance(arch, len(done), None, f"all {len(done)} finished trials scored the "
                          f"same val_acc ({scores[0]:.4f}): nothing to attribute{extra}")
    try:
        values = _fanova(rows, scores, varying, seed=seed)
    except Exception as err:  # a report section, not a reason to fail the command
        return Importance(arch, len(done), None, f"importance evaluation failed: "
                          f"{type(err).__name__}: {err}")
    note = f"fANOVA over {len(done)} finished trials{extra}"
    if len(done) < FEW_TRIALS:
        note += "; few trials: indicative only"
    if constant:
        note += f"; constant, so not assessed: {', '.join(constant)}"
    return Importance(arch, len(done), values, note)


def _fanova(rows: Sequence[dict[str, float]], scores: Sequence[float], names: Sequence[str],
            *, seed: int) -> dict[str, float]:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.trial import create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" lines
    distributions = infer_distributions(rows, names)
    study = optuna.create_study(direction="maximize")
    for row, score in zip(rows, scores, strict=True):
        params = {n: int(row[n]) if n in INT_PARAMS and row[n].is_integer() else row[n]
                  for n in names}
        study.add_trial(create_trial(params=params, distributions=distributions, value=score))
    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
    return {name: float(value) for name, value in found.items()}


def reference_points(dataset: str | None) -> list[dict[str, Any]]:
    """The papers' results for this dataset (CIFAR-10/100 only), with parameter counts.

    The counts are those of our zoo for the dataset's number of classes: what a
    sweep of the paper's configuration would log as ``num_params``.
    """
    if dataset not in NUM_CLASSES:
        return []
    out = []
    for point in PAPER_POINTS:
        if dataset in point.error:
            error = point.error[dataset]
            out.append({"label": point.label, "arch": point.arch,
                        "params": point.params_for(NUM_CLASSES[dataset]), "test_error": error,
                        "test_acc": round(1 - error / 100, 6), "source": point.source})
    return out


# -- figures ----------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas: no pyplot state, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colour(arch: str) -> str:
    try:
        return get_family(arch).colour
    except ValueError:  # a run of a family no longer installed
        return "tab:purple"


def plot_curves(trials: Sequence[Trial], path: Path) -> Path | None:
    """val_acc per epoch for every run; the best few bold and named in the legend."""
    from matplotlib.ticker import MaxNLocator

    drawn = [t for t in trials if t.curve]
    if not drawn:
        return None
    best = {t.run_id for t in sorted((t for t in drawn if t.val_acc is not None),
                                     key=lambda t: -t.val_acc)[:HIGHLIGHT]}
    fig = _figure(8, 4.8)
    ax = fig.subplots()
    for arch in sorted({t.arch for t in drawn}):
        ax.plot([], [], color=_colour(arch), label=arch)  # one legend entry per colour
    for t in sorted(drawn, key=lambda t: t.run_id in best):  # the best on top
        epochs, accs = zip(*t.curve, strict=True)
        top = t.run_id in best
        ax.plot(epochs, accs, color=_colour(t.arch), lw=2.4 if top else 1.0,
                alpha=1.0 if top else 0.35, marker="o", ms=3 if top else 2,  # 1-epoch runs too
                label=f"{t.name} ({t.val_acc:.3f})" if top else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"Learning curves ({len(drawn)} trials; the best {len(best)} bold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=DPI)
    return path


def plot_pareto(trials: Sequence[Trial], front: Sequence[str], refs: Sequence[dict[str, Any]],
                path: Path) -> Path | None:
    """Best val_acc against parameters (log axis), the Pareto front and paper points."""
    shown = [t for t in trials if t.val_acc is not None and t.num_params]
    if not shown:
        return None
    fig = _figure(8, 5)
    ax = fig.subplots()
    for arch in sorted({t.arch for t in shown}):
        mine = [t for t in shown if t.arch == arch]
        ax.scatter([t.num_params for t in mine], [t.val_acc for t in mine], s=36,
                   color=_colour(arch), alpha=0.8, label=f"{arch} (val)")
    on_front = sorted((t for t in shown if t.run_id in front), key=lambda t: t.num_params)
    ax.step([t.num_params for t in on_front], [t.val_acc for t in on_front], where="post",
            color="black", lw=1.2, label="Pareto front")
    ax.scatter([t.num_params for t in on_front], [t.val_acc for t in on_front], s=110,
               facecolors="none", edgecolors="black", lw=1.4)
    placed = [r for r in refs if r["params"]]
    if placed:
        ax.scatter([r["params"] for r in placed], [r["test_acc"] for r in placed], marker="*",
                   s=140, color="gold", edgecolors="black", lw=0.6,
                   label="papers (test acc)", zorder=3)
        # Numbers, not names: the papers' models crowd around 1M and 10M parameters
        # (the reference table on the page names each number).
        for n, above in _label_sides(refs).items():
            ref = refs[n - 1]
            ax.annotate(str(n), (ref["params"], ref["test_acc"]), fontsize=7, ha="center",
                        xytext=(0, 7 if above else -12), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("accuracy")
    ax.set_title("Validation accuracy against parameters")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=DPI)
    return path


def _label_sides(refs: Sequence[dict[str, Any]]) -> dict[int, bool]:
    """Reference number -> label above its star (else below).

    Along the x axis labels alternate so that neighbours do not collide; of two
    models within 15 % in parameters, the more accurate one is labelled above.
    """
    numbered = sorted((r["params"], n) for n, r in enumerate(refs, start=1) if r["params"])
    sides = {n: k % 2 == 1 for k, (_, n) in enumerate(numbered)}
    for (p_a, a), (p_b, b) in itertools.pairwise(numbered):
        if p_b < 1.15 * p_a:
            higher = a if refs[a - 1]["test_acc"] >= refs[b - 1]["test_acc"] else b
            sides[a], sides[b] = a == higher, b == higher
    return sides


def parallel_axes(trials: Sequence[Trial]) -> tuple[list[str], list[list[float]], list[str]]:
    """(axis names, per-trial values scaled to [0, 1], constant names) for one architecture.

    Each hyperparameter that varies gets an axis normalised to its observed
    range (log-scaled when it spans 10x, like a learning rate); the last axis is
    val_acc. Constant hyperparameters have no axis: they are listed instead.
    """
    shown = [t for t in trials if t.val_acc is not None]
    rows = [numeric_params(t.params) for t in shown]
    varying, constant = varying_params(rows)
    if not varying:
        return [], [], constant
    for row, t in zip(rows, shown, strict=True):
        row["val_acc"] = t.val_acc
    names = [*varying, "val_acc"]
    columns = []
    for name in names:
        values = [r[name] for r in rows]
        if name != "val_acc" and is_log_scale(values):
            values = [math.log10(v) for v in values]
        low, high = min(values), max(values)
        columns.append([(v - low) / (high - low) if high > low else 0.5 for v in values])
    return names, [list(v) for v in zip(*columns, strict=True)], constant


def plot_parallel(arch: str, trials: Sequence[Trial], path: Path) -> Path | None:
    """Parallel coordinates of one architecture, lines coloured by best val_acc."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mine = [t for t in trials if t.arch == arch and t.val_acc is not None]
    names, lines, _ = parallel_axes(mine)
    if not names:
        return None
    rows = [numeric_params(t.params) | {"val_acc": t.val_acc} for t in mine]
    accs = [t.val_acc for t in mine]
    norm = Normalize(min(accs), max(accs) if max(accs) > min(accs) else min(accs) + 1e-9)
    cmap = matplotlib.colormaps["viridis"]
    fig = _figure(max(5.0, 1.6 * len(names) + 2), 4.2)
    ax = fig.subplots()
    xs = list(range(len(names)))
    for line, acc in sorted(zip(lines, accs, strict=True), key=lambda p: p[1]):
        ax.plot(xs, line, color=cmap(norm(acc)), lw=1.8, alpha=0.85)
    for x, name in enumerate(names):
        ax.axvline(x, color="grey", lw=0.8)
        values = [r[name] for r in rows]
        ax.annotate(_short(max(values)), (x, 1.0), xytext=(0, 4), textcoords="offset points",
                    ha="center", fontsize=7)
        ax.annotate(_short(min(values)), (x, 0.0), xytext=(0, -11),
                    textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.08)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{arch}: {len(mine)} trials (axes scaled to the observed range)")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="best val_acc")
    fig.savefig(path, dpi=DPI)
    return path


def plot_importances(results: Sequence[Importance], path: Path) -> Path | None:
    """One bar chart per architecture that has importances."""
    shown = [r for r in results if r.values]
    if not shown:
        return None
    fig = _figure(5.0 * len(shown), 3.2)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, result in zip(axes, shown, strict=True):
        assert result.values is not None
        names = list(result.values)[::-1]  # largest at the top
        ax.barh(names, [result.values[n] for n in names], color=_colour(result.arch))
        ax.set_xlim(0, 1)
        ax.set_xlabel("importance (fANOVA, sums to 1)")
        ax.set_title(f"{result.arch} ({result.trials} finished trials)")
    fig.savefig(path, dpi=DPI)
    return path


def plot_confirm(summary: dict[str, Any] | None, path: Path) -> Path | None:
    """Test error per confirmed configuration: each seed, mean ± std, the paper's figure."""
    configs = [c for c in (summary or {}).get("configs", []) if c["test_error"].get("n")]
    if not configs:
        return None
    fig = _figure(1.2 + 1.1 * len(configs), 3.4)
    ax = fig.subplots()
    for x, c in enumerate(configs):
        errors = [100.0 * (1.0 - v) for v in c.get("test_acc_by_seed", {}).values()
                  if v is not None]
        ax.scatter([x] * len(errors), errors, s=14, color="0.55", zorder=2)
        ax.errorbar([x], [c["test_error"]["mean"]], yerr=[c["test_error"]["std"]], fmt="o",
                    color=_colour(c["arch"]), capsize=5, zorder=3)
        if c.get("paper"):
            ax.scatter([x], [c["paper"]["error"]], marker="x", color="black", zorder=4,
                       label="paper" if x == 0 else None)
    ax.set_xticks(range(len(configs)), [c["label"] for c in configs])
    ax.set_xlim(-0.6, len(configs) - 0.4)
    ax.set_ylabel("test error % (mean ± std, seeds)")
    ax.set_title(f"{summary['round']}: {summary['seeds']} seeds each")  # type: ignore[index]
    fig.savefig(path, dpi=DPI)
    return path


def _short(value: float) -> str:
    return f"{value:.3g}"


# -- HTML -------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.front td { font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-style: italic; } .meta td { text-align: left; border: none; }
"""

LEADERBOARD = ("rank", "run", "arch", "depth", "width", "dropout", "lr", "milestones",
               "params", "epochs", "status", "val acc", "test acc", "GPU-hours")


def _fmt(value: Any, digits: int = 4) -> str:
    from orchestrator.leaderboard import format_cell

    return "-" if value == "n/a" else format_cell(value, digits)


def _param(value: str | None) -> str:
    """A logged param for display: long floats (sampled learning rates) to 4 digits."""
    if value is None or value == "n/a":
        return "-"
    try:
        number = float(value)
    except ValueError:
        return value
    return value if len(value) <= 8 else f"{number:.4g}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 0,
           row_class: Sequence[str] | None = None) -> str:
    """An HTML table of already formatted cells; the first ``left`` columns left-aligned."""
    def cls(i: int) -> str:
        return ' class="l"' if i < left else ""

    head = "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(header))
    body = []
    for n, row in enumerate(rows):
        klass = f' class="{row_class[n]}"' if row_class and row_class[n] else ""
        cells = "".join(f"<td{cls(i)}>{html.escape(c)}</td>" for i, c in enumerate(row))
        body.append(f"<tr{klass}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def leaderboard_rows(trials: Sequence[Trial]) -> list[list[str]]:
    return [[str(t.rank), t.name, t.arch, _param(t.params.get("depth")),
             _param(t.params.get("width")), _param(t.params.get("dropout")),
             _param(t.params.get("lr")), t.params.get("milestones", "-"), _fmt(t.num_params),
             str(len(t.curve)), t.status, _fmt(t.val_acc), _fmt(t.test_acc),
             f"{t.gpu_hours:.3f}"] for t in trials]


def render_html(*, manifest: Any, dataset: str | None, trials: Sequence[Trial],
                front: Sequence[str], refs: Sequence[dict[str, Any]],
                importances: Sequence[Importance], figures: dict[str, Path | None],
                confirmed: dict[str, Any] | None = None) -> str:
    """The whole page: text, tables and the figures inlined as base64 PNG."""
    from orchestrator.runmap import status_kind

    by_status: dict[str, int] = {}
    for t in trials:
        kind = status_kind(t.status)
        by_status[kind] = by_status.get(kind, 0) + 1
    total_gpu = sum(t.gpu_hours for t in trials)
    meta = [("sweep", manifest.name), ("tracking", manifest.tracking_uri),
            ("experiment / parent run", f"{manifest.experiment} / {manifest.parent_run_id}"),
            ("dataset", dataset or "unknown"), ("search metric", manifest.objective),
            ("trials", ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none"),
            ("GPU-hours", f"{total_gpu:.3f} (wall time x the run's {GPU_TAG} tag; a run "
                          "without the tag ran on CPUs and counts 0)"),
            ("generated", time.strftime("%Y-%m-%d %H:%M:%S %Z"))]
    parts = [f"<h1>wrnsweep report: {html.escape(manifest.name)}</h1>",
             '<table class="meta">' + "".join(
                 f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
                 for k, v in meta) + "</table>"]

    parts.append("<h2>Leaderboard</h2>")
    if trials:
        parts.append(_table(LEADERBOARD, leaderboard_rows(trials), left=3,
                            row_class=["front" if t.run_id in front else "" for t in trials]))
        parts.append(_note(f"Ranked as `wrnsweep best` ranks them (best {manifest.metric}); "
                           "val acc "
                           "is the best val_acc of any epoch; bold rows are on the Pareto front."))
    else:
        parts.append(_note("The sweep has no trial runs in MLflow."))

    if confirmed:
        from orchestrator.confirm import table_rows

        rows = table_rows(confirmed)
        parts.append("<h2>Confirmed over seeds</h2>")
        parts.append(_table(tuple(rows[0]), [list(r.values()) for r in rows], left=2))
        parts.append(_img(figures.get("confirm"), "test error over seeds"))
        parts.append(_note(
            f"{confirmed['round']}: the search's top {len(rows)} configurations trained again "
            f"from scratch with {confirmed['seeds']} new seeds each, "
            f"{confirmed['epochs_text']}, on {confirmed['train_on']}; mean ± sample std "
            "(n - 1); * is the registered champion (best mean val_acc, its seed closest to "
            "the median). Test accuracy is measured once per run, never used to choose."))

    parts.append("<h2>Learning curves</h2>")
    parts.append(_img(figures.get("curves"), "learning curves") or
                 _note("No trial logged val_acc yet."))

    parts.append("<h2>Accuracy against parameters</h2>")
    parts.append(_img(figures.get("pareto"), "accuracy against parameters") or
                 _note("No trial has both val_acc and num_params."))
    on_front = [t for t in trials if t.run_id in front]
    if on_front:
        parts.append("<p>Pareto front (most accurate for its size; none is both smaller and "
                     "more accurate):</p>")
        parts.append(_table(("run", "params", "val acc"),
                            [[t.name, _fmt(t.num_params), _fmt(t.val_acc)]
                             for t in sorted(on_front, key=lambda t: t.num_params or 0)],
                            left=1))
    parts.append("<h3>Paper reference points</h3>")
    if refs:
        parts.append(_table(("#", "model", "params (our zoo)", "test error %", "test acc",
                             "source"),
                            [[str(n), r["label"], _fmt(r["params"]), f"{r['test_error']:.2f}",
                              f"{r['test_acc']:.4f}", r["source"]]
                             for n, r in enumerate(refs, start=1)], left=2))
        parts.append(_note("Papers report test accuracy after full training (200 epochs or "
                           "more); the sweep's points are validation accuracy."))
    else:
        parts.append(_note(f"Shown for CIFAR-10 and CIFAR-100 sweeps only; this sweep's "
                           f"dataset is {dataset or 'unknown'}."))

    parts.append("<h2>Hyperparameters per architecture</h2>")
    for arch in sorted({t.arch for t in trials}):
        parts.append(f"<h3>{html.escape(arch)}</h3>")
        mine = [t for t in trials if t.arch == arch and t.val_acc is not None]
        _, _, constant = parallel_axes(mine)
        figure = figures.get(f"parallel_{arch}")
        parts.append(_img(figure, f"parallel coordinates {arch}") or _note(
            f"{len(mine)} trial(s) with val_acc and no numeric hyperparameter that varies: "
            "no parallel coordinates."))
        if constant:
            fixed = numeric_params(mine[0].params)
            parts.append(_note("fixed: " + ", ".join(f"{n}={_short(fixed[n])}"
                                                     for n in constant)))

    parts.append("<h2>Hyperparameter importances</h2>")
    parts.append(_note("Optuna's fANOVA evaluator on an in-memory study rebuilt from each "
                       "architecture's finished trials (objective: best val_acc; distributions "
                       "span the observed values; numeric hyperparameters only)."))
    parts.append(_img(figures.get("importance"), "hyperparameter importances"))
    for result in importances:
        parts.append(f"<h3>{html.escape(result.arch)}</h3>")
        if result.values:
            parts.append(_table(("hyperparameter", "importance"),
                                [[n, f"{v:.3f}"] for n, v in result.values.items()], left=1))
        parts.append(_note(result.note))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>wrnsweep report: {html.escape(manifest.name)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(p for p in parts if p)
            + "\n</body></html>\n")


# -- the command ----------------------------------------------------------------------------
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def build_figures(trials: Sequence[Trial], front: Sequence[str], refs: Sequence[dict[str, Any]],
                  importances: Sequence[Importance], out: Path) -> dict[str, Path | None]:
    """Write every PNG into ``out``; name -> path (None where there is nothing to draw)."""
    figures: dict[str, Path | None] = {
        "curves": plot_curves(trials, out / "learning_curves.png"),
        "pareto": plot_pareto(trials, front, refs, out / "accuracy_vs_params.png"),
    }
    for arch in sorted({t.arch for t in trials}):
        figures[f"parallel_{arch}"] = plot_parallel(
            arch, trials, out / f"parallel_{_slug(arch)}.png")
    figures["importance"] = plot_importances(importances, out / "importances.png")
    return figures


def write_report(client: Any, manifest: Any, out: str | Path, *,
                 log_to_mlflow: bool = True) -> ReportResult:
    """Build the report of ``manifest``'s sweep into ``out`` and log it to the parent run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trials = collect_trials(client, manifest)
    dataset = sweep_dataset(client, manifest, trials)
    scored = [t for t in trials if t.val_acc is not None and t.num_params]
    front = [scored[i].run_id for i in pareto_front(
        [(float(t.num_params or 0), float(t.val_acc or 0.0)) for t in scored])]
    refs = reference_points(dataset)
    importances = [arch_importance(arch, trials) for arch in sorted({t.arch for t in trials})]
    figures = build_figures(trials, front, refs, importances, out)
    from orchestrator.confirm import read_summary

    confirmed = read_summary(client.get_run(manifest.parent_run_id).data.tags) \
        if manifest.parent_run_id else None
    figures["confirm"] = plot_confirm(confirmed, out / "confirm.png")

    page = render_html(manifest=manifest, dataset=dataset, trials=trials, front=front, refs=refs,
                       importances=importances, figures=figures, confirmed=confirmed)
    html_path = out / HTML_FILE
    html_path.write_text(page, encoding="utf-8")
    data = {
        "sweep": manifest.name, "tracking_uri": manifest.tracking_uri,
        "parent_run_id": manifest.parent_run_id, "dataset": dataset,
        "trials": [{**{k: v for k, v in asdict(t).items() if k != "curve"},
                    "gpu_hours": t.gpu_hours, "curve": [list(p) for p in t.curve]}
                   for t in trials],
        "pareto_front": [t.name for t in trials if t.run_id in front],
        "references": refs,
        "importances": [asdict(r) for r in importances],
        "confirm": confirmed,
        "figures": {k: v.name for k, v in figures.items() if v is not None},
    }
    data_path = out / DATA_FILE
    data_path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    written = [p for p in figures.values() if p is not None]
    if log_to_mlflow and manifest.parent_run_id:
        for path in [html_path, data_path, *written]:
            client.log_artifact(manifest.parent_run_id, str(path), ARTIFACT_DIR)
    return ReportResult(html=html_path, data=data_path, figures=written,
                        artifacts_logged=bool(log_to_mlflow and manifest.parent_run_id))
