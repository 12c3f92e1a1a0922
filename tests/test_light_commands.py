"""Read-only commands import neither Ray, Optuna nor torch: printing a leaderboard or
checking a file costs MLflow's import (``best``) or less, not the whole stack.

Each command runs in a fresh interpreter through ``orchestrator.cli.main``, as the
console script would; the modules it loaded are read back from ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.manifest import Manifest
from orchestrator.store import PARENT_TAG, mlflow_client

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"ray", "optuna", "torch"}


def _modules_of(*args: str, cwd: Path) -> tuple[int, list[str], str]:
    code = textwrap.dedent(f"""
        import json, sys
        from orchestrator.cli import main
        sys.argv = ["wrnsweep", *{list(args)!r}]
        try:
            main()
        except SystemExit as done:
            code = done.code
        print(json.dumps({{"code": code, "modules": sorted(sys.modules)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    return last["code"], last["modules"], proc.stdout + proc.stderr


def _heavy(modules: list[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & HEAVY)


@pytest.fixture()
def sweep_folder(tmp_path: Path) -> Path:
    """A finished sweep's folder as best reads it: plan, SQLite store, two trial runs."""
    home = tmp_path / "runs" / "light"
    home.mkdir(parents=True)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = mlflow_client(uri)
    exp = client.create_experiment("light", artifact_location=(home / "mlartifacts").as_uri())
    parent = client.create_run(exp, run_name="light").info.run_id
    for name, best in (("resnet-8-1-a", 0.8), ("wrn-10-1-b", 0.7)):
        run = client.create_run(exp, run_name=name, tags={PARENT_TAG: parent}).info.run_id
        client.log_param(run, "arch", name.split("-")[0])
        client.log_metric(run, "best_val_acc", best)
        client.set_terminated(run)
    Manifest(name="light", sweep_file="", storage_path=str(home.parent), home=str(home),
         tracking_uri=uri, experiment="light", registered_model="light", address=None,
         metric="val_acc", mode="max", num_samples=2, top_k=1, experiment_id=exp,
         parent_run_id=parent).save()
    return home


def test_best_imports_no_ray_optuna_or_torch(sweep_folder: Path) -> None:
    code, modules, out = _modules_of("best", str(sweep_folder), "--json", cwd=sweep_folder)
    assert code in (0, None), out
    assert '"best_val_acc": 0.8' in out  # the leaderboard was printed
    assert "mlflow" in {m.split(".")[0] for m in modules}
    assert not _heavy(modules), f"best imported {_heavy(modules)}"


def test_a_missing_folder_is_answered_without_the_stack(tmp_path: Path) -> None:
    code, modules, out = _modules_of("best", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert code == 2 and "no such sweep folder" in out
    assert not _heavy(modules) and "mlflow" not in {m.split(".")[0] for m in modules}


def test_validate_and_help_import_no_heavy_module(tmp_path: Path) -> None:
    smoke = str(ROOT / "search_spaces" / "smoke.yaml")
    for args in (("validate", smoke), ("train", "--help"), ("ui", "--help"),
                 ("report", "--help")):
        code, modules, out = _modules_of(*args, cwd=tmp_path)
        assert code in (0, None), out
        assert not _heavy(modules), f"{' '.join(args)} imported {_heavy(modules)}"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args", [
    ("jobs", "list", "--address", "http://127.0.0.1:{port}"),
    ("jobs", "status", "raysubmit_x", "--address", "http://127.0.0.1:{port}"),
    ("jobs", "logs", "raysubmit_x", "--address", "http://127.0.0.1:{port}"),
    ("jobs", "stop", "raysubmit_x", "--address", "http://127.0.0.1:{port}"),
])
def test_jobs_commands_talk_to_the_api_without_ray(tmp_path: Path, args: tuple[str, ...]
                                                   ) -> None:
    """`jobs` speaks the Jobs REST API itself: an unreachable head is one line, exit 1,
    and neither Ray nor MLflow is imported to say so."""
    port = _closed_port()
    code, modules, out = _modules_of(*(a.format(port=port) for a in args), cwd=tmp_path)
    assert code == 1 and "cannot reach the Ray Jobs API at http://127.0.0.1:" in out, out
    assert "Traceback" not in out
    assert not _heavy(modules) and "mlflow" not in {m.split(".")[0] for m in modules}


@pytest.mark.parametrize("command", ["ui", "report", "confirm", "dashboard"])
def test_read_only_commands_answer_a_missing_folder_light(tmp_path: Path, command: str
                                                          ) -> None:
    code, modules, out = _modules_of(command, str(tmp_path / "nowhere"), cwd=tmp_path)
    assert code == 2, out
    assert not _heavy(modules), f"{command} imported {_heavy(modules)}"
