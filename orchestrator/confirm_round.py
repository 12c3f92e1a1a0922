"""Running a confirm round (``wrnsweep confirm``, and its ``resume``): see ``confirm``.

The round is built from the sweep's own pieces: the trusted manifest, the dataset
and resources of the sweep file, the sweep's callbacks (MLflow child runs of the
parent run, progress, Tune's logs, signing), Tune's FIFO scheduler and a
``BasicVariantGenerator`` that hands out the K x N fixed configurations. What
it leaves: ``<sweep>/confirm-N/`` (Tune), ``mlflow-runs.confirm-N.json`` (trial
-> run), the round's state in ``wrnsweep.json`` (``extra.confirm``: what to
run, and ``done`` once the statistics are logged and the champion registered).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.config import SweepConfig, load_sweep
from orchestrator.confirm import (
    CONFIRM_TAG,
    ROUND_TAG,
    SEED_TAG,
    SELECTION,
    SUMMARY_TAG,
    Chosen,
    ConfirmSpec,
    champion_config,
    finite,
    format_summary,
    jobs,
    median_seed,
    paper_error,
    parent_metrics,
    seeds_for,
    state_of,
    summarize,
)
from orchestrator.store import PARENT_TAG, TRIAL_TAG, tracking_env
from orchestrator.sweep import (
    SWEEP_FILE,
    Echo,
    Manifest,
    Session,
    SweepError,
    SweepInputError,
    _finished_status,
    _fit,
    _run_tuner,
    _trainable,
    prepare,
    trusted_manifest,
)


def confirm(home: str, spec: ConfirmSpec, *, echo: Echo = print, address: str | None = None,
            trust: bool = False) -> dict[str, Any]:
    """Re-train the top ``spec.top`` configurations of the finished sweep in ``home``."""
    spec.check()
    args = f" --top {spec.top} --seeds {spec.seeds}"
    manifest = trusted_manifest(home, "confirm", vouch=trust, args=args)
    tracking_env()
    cfg = load_sweep(Path(manifest.home) / SWEEP_FILE)
    pending = manifest.confirm
    if pending and not pending.get("done"):
        raise SweepInputError(f"{home}: {pending['round']} has not finished; "
                              f"`wrnsweep resume {home}` continues it")
    if _finished_status(manifest) is None:
        raise SweepInputError(f"{home}: the sweep has not finished; `wrnsweep resume {home}` "
                              "first (confirm re-trains the configurations a finished search "
                              "ranked)")
    if address is not None:
        manifest = manifest.replace(address=address)
    from orchestrator.store import mlflow_client

    client = mlflow_client(manifest.tracking_uri)
    chosen = choose(client, manifest, cfg, spec.top)
    if not chosen:
        raise SweepInputError(f"{home}: the search has no trial with a finite "
                              f"{manifest.metric} to confirm")
    if len(chosen) < spec.top:
        echo(f"note: the search ranked only {len(chosen)} configuration(s) with a "
             f"{manifest.metric}; confirming those")
    done = int(pending["round"].rsplit("-", 1)[1]) if pending else 0
    state = state_of(spec, f"confirm-{done + 1}", chosen,
                     seeds_for(cfg.search.seed, spec.seeds))
    session = prepare(cfg, manifest, echo)
    # The parent run is RUNNING again before the manifest names the round: `resume` sees
    # an unfinished sweep and continues this round.
    client.update_run(manifest.parent_run_id, status="RUNNING")
    client.set_tag(manifest.parent_run_id, ROUND_TAG, state["round"])
    manifest = manifest.replace(confirm=state)
    manifest.save()
    echo(f"confirming {len(chosen)} configuration(s) of sweep {manifest.name} with seeds "
         f"{', '.join(map(str, state['seeds']))} -> "
         f"{manifest.experiment_path}/{state['round']}")
    return _run(cfg, manifest, session, echo, restore=False)


def resume_confirm(manifest: Manifest, *, echo: Echo = print) -> Any:
    """Continue the confirm round a killed or interrupted driver left (``resume``)."""
    cfg = load_sweep(Path(manifest.home) / SWEEP_FILE)
    assert manifest.confirm is not None
    session = prepare(cfg, manifest, echo)
    echo(f"resuming {manifest.confirm['round']} of sweep {manifest.name}")
    return _run(cfg, manifest, session, echo, restore=True)


def _paths(manifest: Manifest, state: dict[str, Any]) -> tuple[str, str]:
    return f"{manifest.experiment_path}/{state['round']}", f"mlflow-runs.{state['round']}.json"


def _run(cfg: SweepConfig, manifest: Manifest, session: Session, echo: Echo, *,
         restore: bool) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    state = manifest.confirm
    assert state is not None
    path, runs_file = _paths(manifest, state)
    trainable = _trainable(cfg, session)
    metric = None if state["train_on"] == "train+val" else manifest.metric
    # A driver killed before Tune wrote the round's state left nothing to restore: no
    # trial ran, so the round starts afresh.
    if restore and tune.Tuner.can_restore(path):
        from orchestrator.sweep import _callbacks, _round_prefix

        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        local = getattr(tuner, "_local_tuner", None)
        if local is not None:  # callbacks and trials of this folder, where it is now
            from orchestrator.relocate import trials_here

            local.get_run_config().callbacks = _callbacks(
                cfg, manifest, echo, runs_file, len(jobs(state)),
                prefix=_round_prefix(manifest, path))
            local._tune_config.scheduler = trials_here(local._tune_config.scheduler, path)
        results = _run_tuner(tuner, manifest)
    else:
        todo = jobs(state)
        searcher = fixed_configs(todo)
        results = _fit(cfg, manifest, searcher, len(todo), trainable, (path, runs_file), echo,
                       scheduler=FIFOScheduler(), metric=metric)
    return finish(manifest, state, results, echo=echo)


def fixed_configs(configs: list[dict[str, Any]]) -> Any:
    """A Tune searcher that hands out ``configs`` in order, once each, then is done.

    Its state (which trial got which config) is saved as JSON, like the sweep's
    searcher (``orchestrator.search``): nothing of it is unpickled on resume.
    """
    from ray.tune.search import Searcher

    class FixedConfigs(Searcher):
        CKPT_FILE_TMPL = "searcher-state-{}.json"

        def __init__(self) -> None:
            super().__init__()
            self.configs = configs
            self.given: dict[str, int] = {}  # Tune trial id -> index in configs

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            if trial_id not in self.given:
                if len(self.given) >= len(self.configs):
                    return Searcher.FINISHED
                self.given[trial_id] = len(self.given)
            return dict(self.configs[self.given[trial_id]])

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            pass  # every config runs once, whatever the others did

        def save(self, checkpoint_path: str) -> None:
            Path(checkpoint_path).write_text(json.dumps(
                {"configs": self.configs, "given": self.given}) + "\n")

        def restore(self, checkpoint_path: str) -> None:
            state = json.loads(Path(checkpoint_path).read_text())
            self.configs, self.given = state["configs"], state["given"]

    return FixedConfigs()


def choose(client: Any, manifest: Manifest, cfg: SweepConfig, top: int) -> list[Chosen]:
    """The search's ``top`` configurations, ranked by its validation metric (never test),
    each as the flat trial config its MLflow run records (the sweep file fills in the
    constants the run does not: data and device settings)."""
    from orchestrator.leaderboard import best_key, leaderboard

    score = best_key(manifest.metric)
    rows = [r for r in leaderboard(client, manifest) if finite(r.get(score)) is not None]
    chosen = []
    for i, row in enumerate(rows[:top], start=1):
        params = client.get_run(row["run_id"]).data.params
        chosen.append(Chosen(label=f"c{i}", run_id=row["run_id"], score=float(row[score]),
                             config=config_from_params(params, cfg)))
    return chosen


def config_from_params(params: dict[str, str], cfg: SweepConfig) -> dict[str, Any]:
    """A trial's flat config from its MLflow params (``tracking.run_params``)."""
    from orchestrator.leaderboard import param_value
    from orchestrator.tracking import TRAINING_PARAMS
    from trainables.models.registry import get_family

    arch = params["arch"]
    family = get_family(arch)
    out: dict[str, Any] = {"arch": arch, **cfg.recipe_constants(arch), **cfg.dataset_options()}
    for hp in family.hparams:
        if params.get(hp.name) not in (None, "n/a"):
            out[hp.name] = hp.kind(params[hp.name])
    for name in TRAINING_PARAMS:
        text = params.get(name)
        if text is None or name in ("dataset", "seed"):
            continue
        if name == "nesterov":
            out[name] = text == "True"
        elif name == "milestones":
            out[name] = [float(x) for x in text.split(",") if x]
        else:
            out[name] = param_value(text)
    return out


def _runs_of(client: Any, manifest: Manifest, round_name: str) -> list[Any]:
    return client.search_runs(
        [manifest.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{manifest.parent_run_id}' and "
                      f"tags.`{ROUND_TAG}` = '{round_name}'", max_results=5000)


def _final(run: Any) -> dict[str, Any]:
    """A confirm run's numbers: its seed, test accuracy, best validation, last train loss."""
    m, t = run.data.metrics, run.data.tags
    return {"seed": int(t[SEED_TAG]), "label": t[CONFIRM_TAG], "run_id": run.info.run_id,
            "trial_id": t.get(TRIAL_TAG), "test_acc": finite(m.get("test_acc")),
            "best_val_acc": finite(m.get("best_val_acc")),
            "train_loss": finite(m.get("train_loss"))}


def finish(manifest: Manifest, state: dict[str, Any], results: Any, *,
           echo: Echo = print) -> dict[str, Any]:
    """Close the round's runs, log the statistics, register the champion, print the table."""
    from orchestrator.runmap import load_run_map, reconcile_runs
    from orchestrator.store import mlflow_client
    from orchestrator.tracking import BufferedWriter

    client = mlflow_client(manifest.tracking_uri)
    _, runs_file = _paths(manifest, state)
    outcomes = {(r.metrics or {}).get("trial_id"): "error" if r.error else "ok"
                for r in results}
    writer = BufferedWriter(echo=echo)
    reconcile_runs(client, load_run_map(Path(manifest.home) / runs_file), outcomes,
                   writer.submit)
    writer.close()
    finished = [_final(r) for r in _runs_of(client, manifest, state["round"])
                if r.info.status == "FINISHED"]
    summary = summary_of(state, finished, manifest)
    if not any(c["test_acc"].get("n") for c in summary["configs"]):
        client.set_terminated(manifest.parent_run_id, status="FAILED")
        raise SweepError(f"no confirm run finished; see {manifest.experiment_path}/"
                         f"{state['round']}")
    _register(client, manifest, state, summary, finished, results, echo)
    for key, value in parent_metrics(summary).items():
        client.log_metric(manifest.parent_run_id, key, value)
    client.set_tag(manifest.parent_run_id, SUMMARY_TAG, json.dumps(summary, sort_keys=True))
    manifest.replace(confirm={**state, "done": True}).save()
    client.set_terminated(manifest.parent_run_id, status="FINISHED")
    echo("")
    echo(format_summary(summary))
    return summary


def summary_of(state: dict[str, Any], finished: list[dict[str, Any]], manifest: Manifest
               ) -> dict[str, Any]:
    """The round's table: per configuration its hyperparameters, statistics, paper row."""
    from trainables.models.registry import get_family

    configs = []
    for c in state["configs"]:
        mine = [r for r in finished if r["label"] == c["label"]]
        family = get_family(c["config"]["arch"])
        hparams = {k: c["config"][k] for k in family.hparam_names if k in c["config"]}
        configs.append({**summarize(c["label"], mine), "arch": c["config"]["arch"],
                        "hparams": hparams, "source_run": c["run_id"],
                        "lr": c["config"].get("lr"), "search_score": c["score"],
                        "runs": {str(r["seed"]): r["run_id"] for r in mine},
                        "test_acc_by_seed": {str(r["seed"]): r["test_acc"] for r in mine},
                        "paper": paper_error(c["config"], c["config"].get("dataset", ""))})
    epochs = state["epochs"]
    return {"round": state["round"], "seeds": len(state["seeds"]), "train_on": state["train_on"],
            "metric": manifest.metric, "configs": configs,
            "epochs_text": (f"{epochs} epoch{'s' if epochs != 1 else ''}" if epochs
                            else "each configuration's epochs"),
            "champion": champion_config(configs, state["train_on"])}


def _register(client: Any, manifest: Manifest, state: dict[str, Any], summary: dict[str, Any],
              finished: list[dict[str, Any]], results: Any, echo: Echo) -> None:
    """Register the champion configuration's median seed; tag it with the statistics."""
    from orchestrator.registry import Candidate, register
    from trainables.engine import load_checkpoint

    label = summary["champion"]
    pick = median_seed([r for r in finished if r["label"] == label], state["train_on"])
    result = next((r for r in results if (r.metrics or {}).get("trial_id") == pick["trial_id"]),
                  None)
    if result is None:
        raise SweepError(f"no Tune result for confirm run {pick['run_id']}")
    metric = None if state["train_on"] == "train+val" else manifest.metric
    checkpoint = result.get_best_checkpoint(metric, manifest.mode) if metric else result.checkpoint
    with checkpoint.as_directory() as folder:
        weights = load_checkpoint(folder)
    key, _ = SELECTION[state["train_on"]]
    config_of = next(c for c in summary["configs"] if c["label"] == label)
    version, = register(client, manifest.registered_model, [Candidate(
        run_id=pick["run_id"], trial_id=pick["trial_id"],
        score=pick["best_val_acc"] if pick["best_val_acc"] is not None else float("nan"),
        config=result.config, state=weights, test_acc=pick["test_acc"])],
        metric=manifest.metric, echo=echo)
    client.delete_model_version_tag(manifest.registered_model, version.version, "rank")
    tags = {"confirm.round": state["round"], "confirm.config": label,
            "confirm.seed": str(pick["seed"]), "confirm.chosen_by": f"{key} closest to median",
            "confirm.n": str(config_of["test_acc"]["n"]), "confirm.train_on": state["train_on"]}
    for metric_name in ("test_acc", "test_error", "val_acc"):
        for stat in ("mean", "std", "median", "min", "max"):
            if stat in config_of.get(metric_name, {}):
                tags[f"confirm.{metric_name}_{stat}"] = repr(config_of[metric_name][stat])
    for k, v in tags.items():
        client.set_model_version_tag(manifest.registered_model, version.version, k, v)
    echo(f"registered version {version.version} of '{manifest.registered_model}' "
         f"({label}, seed {pick['seed']}): models:/{manifest.registered_model}@champion")
