"""The ``wrnsweep`` command line as a user drives it: exit codes, messages, side effects.

Commands run as subprocesses of the installed ``wrnsweep`` executable (so exit
codes, stderr and the absence of tracebacks are the real ones); independent ones
run side by side to keep the file fast on 2 cores. Help pages use click's
CliRunner in-process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
from click.testing import CliRunner

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
WRNSWEEP = Path(sys.executable).with_name("wrnsweep")
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))
BAD_FILES = ["depth_range.yaml", "several_issues.yaml", "unknown_arch.yaml",
             "misspelt_search_key.yaml"]
_EXPECT = re.compile(r"^# expect: (\d+) (\S+) \| (.+)$")
HEAVY = {"torch", "ray", "mlflow"}


@dataclass
class Ran:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _env(tmp_path: Path) -> dict[str, str]:
    """The user's environment without cluster/tracking settings; Ray's temp dir in tmp."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # Ray puts every session it starts under $RAY_TMPDIR/ray: if this folder appears,
    # a command started Ray.
    env["RAY_TMPDIR"] = str(tmp_path / "raytmp")
    # No GPU visible (as Ray counts them), so that what fits "this machine" is the
    # same on a GPU machine as on CI's.
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _cli_many(tmp_path: Path, *commands: list[str], timeout: float = 120) -> list[Ran]:
    """Run ``wrnsweep ARGS`` for each command at once from the repository root."""
    env = _env(tmp_path)
    procs = []
    for args in commands:
        start = time.monotonic()
        proc = subprocess.Popen([str(WRNSWEEP), *args], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append((args, start, proc))
    out = []
    for args, start, proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(Ran(args, proc.returncode, stdout, stderr, time.monotonic() - start))
    return out


def _cli(tmp_path: Path, *args: str) -> Ran:
    return _cli_many(tmp_path, list(args))[0]


def _ray_started(tmp_path: Path) -> bool:
    return (tmp_path / "raytmp").exists()


# ------------------------------------------------------------------ validate


def test_validate_accepts_every_shipped_file(tmp_path: Path) -> None:
    """``wrnsweep validate --address auto`` (for a cluster) exits 0 with "ok" for every file
    in search_spaces/; without an address it checks a launch on this machine: smoke.yaml
    fits, the GPU sweeps are refused at their resources line (the CLI tests see no GPU)."""
    assert SHIPPED
    commands = [["validate", str(p.relative_to(ROOT)), "--address", "auto"] for p in SHIPPED]
    commands += [["validate", str(p.relative_to(ROOT))] for p in SHIPPED]
    for ran in _cli_many(tmp_path, *commands):
        if ran.args[-1] == "auto" or ran.args[1].endswith("smoke.yaml"):
            assert ran.returncode == 0, (ran.args, ran.stderr)
            assert ": ok (" in ran.stdout, ran.stdout
        else:
            assert ran.returncode == 2, (ran.args, ran.stdout)
            assert re.search(rf"^(Error: )?{ran.args[1]}:\d+: resources\.\w+: this machine "
                             r"cannot run a \w+ trial \(cpu=\d+, gpu=[\d.]+\): it has",
                             ran.stderr, re.M), ran.stderr
    assert not _ray_started(tmp_path)


def test_validate_checks_every_file_it_is_given(tmp_path: Path) -> None:
    """``wrnsweep validate A B C``: each file checked, every problem printed, exit 2 if any."""
    good = "search_spaces/smoke.yaml"
    bad = sorted((ROOT / "tests" / "bad_sweeps").glob("*.yaml"))[:2]
    ran = _cli(tmp_path, "validate", good, *(str(p.relative_to(ROOT)) for p in bad))
    assert ran.returncode == 2, ran.stderr
    assert f"{good}: ok (" in ran.stdout
    for path in bad:
        assert f"{path.relative_to(ROOT)}:" in ran.stderr
    assert "2 of 3 sweep files are invalid" in ran.stderr and "Traceback" not in ran.stderr
    everything = _cli(tmp_path, "validate", "--address", "auto",
                      *(str(p.relative_to(ROOT)) for p in SHIPPED))
    assert everything.returncode == 0 and everything.stdout.count(": ok (") == len(SHIPPED)


def _expected_lines(path: Path) -> list[tuple[str, str]]:
    """(``FILE:LINE: KEY: `` prefix, message fragment) from the file's ``# expect:`` lines."""
    rel = path.relative_to(ROOT)
    out = []
    for line in path.read_text().splitlines():
        m = _EXPECT.match(line)
        if m:
            lineno, key, fragment = m.groups()
            out.append((f"{rel}:{lineno}: {key}: ", fragment))
    assert out, f"{path} has no '# expect:' line"
    return out


def test_bad_files_exit_2_with_located_messages_and_start_nothing(tmp_path: Path) -> None:
    """validate and launch refuse broken files with exit 2 and ``FILE:LINE: key: message``
    lines, no traceback; launch creates no output folder and never starts Ray."""
    store = tmp_path / "store"
    commands = []
    for name in BAD_FILES:
        rel = f"tests/bad_sweeps/{name}"
        commands += [["validate", rel], ["launch", rel, "--storage", str(store)]]
    for ran in _cli_many(tmp_path, *commands):
        assert ran.returncode == 2, (ran.args, ran.stdout, ran.stderr)
        assert "Traceback" not in ran.stderr + ran.stdout, ran.stderr
        lines = ran.stderr.splitlines()
        for prefix, fragment in _expected_lines(ROOT / ran.args[1]):
            hits = [line for line in lines if line.startswith(prefix)]
            assert any(fragment in line for line in hits), (ran.args, prefix, fragment,
                                                            ran.stderr)
        # Generous: loading the file imports torch (~3 s); starting Ray takes longer,
        # and the RAY_TMPDIR check below is the decisive one.
        assert ran.seconds < 60, ran.args
    assert not store.exists()
    assert not _ray_started(tmp_path)


# ------------------------------------------------------------------- launch --dry-run


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path: Path) -> None:
    """``launch --dry-run`` prints architectures, their spaces and resources, ASHA rungs,
    results folder, tracking URI and registry; overrides show up; nothing is created."""
    store = (tmp_path / "store").resolve()
    plain, other, zero = _cli_many(
        tmp_path,
        ["launch", "search_spaces/smoke.yaml", "--dry-run", "--storage", str(store)],
        ["launch", "search_spaces/smoke.yaml", "--dry-run", "--storage", str(store),
         "--num-samples", "3", "--name", "other"],
        ["launch", "search_spaces/smoke.yaml", "--dry-run", "--storage", str(store),
         "--num-samples", "0"],
    )
    assert plain.returncode == 0, plain.stderr
    text = plain.stdout
    assert "sweep smoke: 6 trials" in text
    assert "architecture wrn: 4 epochs, 1 CPU, 0 GPU per trial" in text
    assert "architecture resnet: 4 epochs, 1 CPU, 0 GPU per trial" in text
    assert re.search(r"^  depth +one of 10, 16$", text, re.M), text
    assert re.search(r"^  width +one of 1, 2$", text, re.M), text
    assert re.search(r"^  dropout +one of 0.0, 0.3$", text, re.M), text
    assert re.search(r"^  depth +one of 8, 14, 20$", text, re.M), text
    assert len(re.findall(r"^  lr +float in \[0.02, 0.2\] \(log\)$", text, re.M)) == 2
    assert "rungs at epochs [2], max 4" in text
    assert f"results: {store}/smoke" in text
    assert f"tracking: sqlite:///{store}/smoke/mlflow.db" in text
    assert "registry: top 2 as 'smoke'" in text

    assert other.returncode == 0, other.stderr
    assert "sweep other: 3 trials" in other.stdout
    assert "study 'other'" in other.stdout
    assert f"results: {store}/other" in other.stdout
    assert f"tracking: sqlite:///{store}/other/mlflow.db (experiment 'other')" in other.stdout
    assert "registry: top 2 as 'other'" in other.stdout

    assert zero.returncode == 2, zero.stdout
    assert "--num-samples" in zero.stderr
    assert "Traceback" not in zero.stderr

    assert not store.exists()
    assert not _ray_started(tmp_path)


def test_dry_run_says_what_launch_will_do(tmp_path: Path) -> None:
    """--num-samples sizes TPE's random start-up in the plan as in the launch, and a
    results folder that exists is named as one launch would refuse."""
    store = (tmp_path / "store").resolve()
    (store / "smoke").mkdir(parents=True)
    ran = _cli(tmp_path, "launch", "search_spaces/smoke.yaml", "--dry-run", "--storage",
               str(store), "--num-samples", "40")
    assert ran.returncode == 0, ran.stderr
    assert "sweep smoke: 40 trials" in ran.stdout
    # a quarter of 40; smoke's one point counts among them, as Optuna counts it
    assert "TPE start-up: random draws until 10 trials have finished (1 starting point(s) " \
        "among them)" in ran.stdout
    assert f"results: {store}/smoke (exists: launch would refuse it" in ran.stdout
    assert not _ray_started(tmp_path)


def test_dry_run_names_the_first_trials(tmp_path: Path) -> None:
    """A TPE sweep without points_to_evaluate starts at the papers' configurations,
    and the plan lists them; a file's own points are counted instead."""
    papers, smoke = _cli_many(tmp_path, ["launch", "tests/sweeps/papers.yaml", "--dry-run"],
                              ["launch", "search_spaces/smoke.yaml", "--dry-run"])
    assert papers.returncode == 0, papers.stderr
    assert "starting points: each architecture's paper configuration" in papers.stdout
    assert ("  wrn: depth=16, width=2, dropout=0.3, lr=0.1, milestones=[0.3, 0.6]\n"
            "  resnet: depth=20, lr=0.1, milestones=[0.5, 0.75]\n") in papers.stdout
    assert smoke.returncode == 0, smoke.stderr
    assert "starting points: 1 (search.points_to_evaluate)" in smoke.stdout
    assert not _ray_started(tmp_path)


# ------------------------------------------------------------------ resume / best


def test_resume_and_best_refuse_what_is_not_a_sweep(tmp_path: Path) -> None:
    """resume on a folder that is not a sweep, and best on a missing folder without
    --tracking-uri, exit 2 with a message that says what to give instead."""
    plain = tmp_path / "plain"
    plain.mkdir()
    resume, best = _cli_many(tmp_path, ["resume", str(plain)],
                             ["best", str(tmp_path / "missing")])
    assert resume.returncode == 2, resume.stderr
    assert f"{plain}: not a wrnsweep sweep folder" in resume.stderr
    assert best.returncode == 2, best.stderr
    assert "no such sweep folder" in best.stderr
    assert "--tracking-uri" in best.stderr
    for ran in (resume, best):
        assert "Traceback" not in ran.stderr
    assert not _ray_started(tmp_path)
    assert list(plain.iterdir()) == []


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_names_and_stores_exit_2_before_anything_starts(tmp_path: Path) -> None:
    """A --name that is no folder/MLflow name, an unreachable tracking server, a missing
    SQLite store, a sweep name with a quote, a folder that is not a sweep: exit 2 with
    one line, no traceback, no folder or database created, Ray never started."""
    store = tmp_path / "store"
    plain = tmp_path / "plain"
    plain.mkdir()
    missing_db = tmp_path / "nodir" / "nope.db"
    smoke = ["launch", "search_spaces/smoke.yaml", "--storage", str(store)]
    runs = _cli_many(
        tmp_path,
        [*smoke, "--name", "it's"],
        [*smoke, "--name", ".."],
        ["submit", "search_spaces/smoke.yaml", "--address", f"http://127.0.0.1:{_closed_port()}",
         "--name", "a b"],
        [*smoke, "--tracking-uri", f"http://127.0.0.1:{_closed_port()}"],
        ["best", str(plain)],
        ["best", "smoke", "--tracking-uri", f"sqlite:///{missing_db}"],
        ["best", "it's", "--tracking-uri", f"sqlite:///{missing_db}"],
        ["export", "models:/smoke@champion", "--out", str(tmp_path / "m.pt")],
        ["export", "models:/smoke@champion", "--out", str(tmp_path / "m.onnx"),
         "--format", "torchscript", "--tracking-uri", f"sqlite:///{missing_db}"],
    )
    expected = ["--name must match", "--name must match", "--name must match",
                "cannot use the tracking store",
                "not a wrnsweep sweep folder", "no such tracking store", "not a sweep name",
                "--tracking-uri", "names a onnx file"]
    for ran, text in zip(runs, expected, strict=True):
        assert ran.returncode == 2, (ran.args, ran.stdout, ran.stderr)
        assert text in ran.stderr, (ran.args, ran.stderr)
        assert "Traceback" not in ran.stderr + ran.stdout, ran.stderr
    assert not store.exists() and not missing_db.parent.exists()
    assert list(plain.iterdir()) == []
    assert not _ray_started(tmp_path)


# ---------------------------------------------------------------------- help


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
    return out


def test_every_command_has_help() -> None:
    """``wrnsweep --help`` lists every command, and each (subcommands too) has --help."""
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    listed = re.findall(r"^  (\S+)", top.output.split("Commands:")[1], re.M)
    assert sorted(listed) == sorted(main.commands)
    assert {"train", "validate", "launch", "resume", "best"} <= set(listed)
    for path in _commands(main):
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage: " in result.output and " ".join(path) in result.output


def test_every_command_is_in_the_readme() -> None:
    """Each top-level command appears in README.md as inline code `wrnsweep NAME ...`."""
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in sorted(main.commands)
               if not re.search(rf"`wrnsweep {re.escape(name)}(\s[^`]*)?`", readme)]
    assert not missing, f"README.md does not mention: {', '.join(missing)}"


def test_help_imports_no_heavy_module(tmp_path: Path) -> None:
    """Importing the CLI (all ``--help`` needs) pulls in neither torch, Ray nor MLflow,
    and ``wrnsweep --help`` answers at once."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import orchestrator.cli"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    modules = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "|" in line]
    assert "orchestrator.cli" in modules and "click" in modules  # the parse works
    heavy = sorted({m for m in modules if m.split(".")[0] in HEAVY})
    assert not heavy, f"importing orchestrator.cli imports {heavy}"

    ran = _cli(tmp_path, "--help")
    assert ran.returncode == 0
    assert ran.seconds < 10, ran.seconds

