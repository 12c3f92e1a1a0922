"""Hostile and careless sweep files: each is refused fast, small, at its line, and starts nothing.

The files are the ones added to ``tests/bad_sweeps/`` for issue 13 (alias bombs,
deep nesting, oversized lists and values, YAML that PyYAML used to crash on, and
everyday slips: ``TPE``, ``min``/``max``, an empty ``wrn:`` block, a missing space
after a colon), plus a few generated here because they are megabytes long or not
text (200,000 choices, 5 MB of comments, a NUL byte, Latin-1 bytes).

Each one is run through ``wrnsweep validate FILE`` and ``wrnsweep launch FILE
--dry-run`` as a subprocess, under an address-space limit (a safety net: a bomb
that got through would die of MemoryError instead of taking the machine), and
must exit 2 with its ``FILE:LINE: key: message`` line, no traceback, a peak RSS
under 500 MB (read per child with ``os.wait4``), and nothing written or started:
no Ray session (Ray creates ``$RAY_TMPDIR/ray``), no storage folder, nothing in
the working directory (the ``!!python/object/apply`` file asks for a ``pwned``
file there). The 2 s bound is on the validator's own work, timed in-process:
interpreter start-up on a loaded 2-core machine is noise that is not the
validator's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, load_sweep, yaml_lines

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "bad_sweeps"
WRNSWEEP = Path(sys.executable).with_name("wrnsweep")
_EXPECT = re.compile(r"^# expect: (\S+) (\S+) \| (.+)$")

# The files of tests/bad_sweeps/ added for issue 13 ("hostile and careless input").
HOSTILE = (
    "alias_bomb",
    "alias_bomb_in_choices",
    "alias_bomb_merge_keys",
    "alias_nesting_too_deep",
    "alias_recursive",
    "alias_undefined",
    "anchor_twice",
    "nesting_too_deep_block",
    "nesting_too_deep_flow",
    "choices_over_limit",
    "value_too_long",
    "key_too_long",
    "integer_out_of_range",
    "escape_sequence_in_value",
    "python_tag",
    "include_tag",
    "second_document",
    "unclosed_quote",
    "unclosed_bracket",
    "unclosed_brace",
    "tab_indent",
    "top_level_scalar",
    "top_level_list_late",
    "algorithm_upper_case",
    "scheduler_upper_case",
    "dataset_upper_case",
    "arch_upper_case",
    "point_arch_upper_case",
    "metric_upper_case",
    "range_min_max",
    "range_lower_upper",
    "choices_as_values",
    "mode_maximize",
    "max_failures_negative",
    "gpu_memory_zero",
    "empty_arch_block",
    "empty_arch_block_only",
    "missing_space_after_colon",
    "yes_as_string",
    "name_is_date",
    "name_bad_date",
    "int_tag_not_int",
    "seed_negative",
    "name_too_long",
    "float_step_tiny",
    "int_range_too_wide",
    "duplicate_choices_int",
    "duplicate_choices_float",
    "homoglyph_key",
    "line_break_in_key",
    "milestones_scalar",
    "choices_null",
    "address_malformed",
    "address_jobs_url",
    "address_port_out_of_range",
    "tracking_uri_unknown_scheme",
    "tracking_uri_no_host",
    "tracking_uri_bad_port",
    "tracking_uri_sqlite_two_slashes",
    "storage_uri_malformed",
)

# Peak resident memory allowed to one `wrnsweep` run (it needs ~35 MB), and the
# address space it may map: a safety net ~20x what it maps (~45 MB), far below
# the 3 GB the alias bomb used to take.
MAX_RSS_MB = 500
ADDRESS_SPACE = 1 << 30
# The validator's own work on any file under 5 MB (issue 13).
MAX_SECONDS = 2.0
# A whole subprocess, start-up included, on a loaded machine: only a hang fails this.
PROCESS_TIMEOUT = 60.0


def _choices(n: int) -> str:
    items = ", ".join(str(16 + 6 * i) for i in range(n))
    return f"name: t\narchitectures:\n  wrn:\n    depth: {{choices: [{items}]}}\n"


# name -> (the file's bytes, its expectations: (line or None, key or "", fragment)).
# A flow list nested 100,000 deep is refused by libyaml's own limit (1,000 flow
# levels, it reads ahead), by ours with the pure-Python parser: both say "nest".
_GENERATED: dict[str, tuple[Callable[[], bytes], list[tuple[int | None, str, str]]]] = {
    "choices_200k": (
        lambda: ("# 200,000 choices\n" + _choices(200_000)).encode(),
        [(5, "architectures.wrn.depth.choices", "this list has more than 1,000 items")],
    ),
    "keys_200k": (
        lambda: (
            "# a recipe with 200,000 keys\nname: t\narchitectures:\n  wrn: {depth: 16}\nrecipe:\n"
            + "".join(f"  k{i}: {i}\n" for i in range(200_000))
        ).encode(),
        [(5, "recipe", "this mapping has more than 1,000 keys")],
    ),
    "values_11k": (
        lambda: (
            "# lists of 999 values: each list is allowed, the file is not\nname: t\n"
            "architectures:\n  wrn: {depth: 16}\nsearch:\n  points_to_evaluate:\n"
            + "".join(f"    - {{depth: 16, x: [{', '.join(['1'] * 999)}]}}\n" for _ in range(11))
        ).encode(),
        [(16, "search.points_to_evaluate.9.x.946", "the file has more than 10,000 values")],
    ),
    "unknown_keys_5k": (
        lambda: (
            "# 990 unknown keys in each of five sections\nname: t\narchitectures:\n"
            "  wrn: {depth: 16}\n"
            + "".join(
                f"{section}:\n" + "".join(f"  depht{i}: 1\n" for i in range(990))
                for section in ("recipe", "search", "scheduler", "tracking", "ray")
            )
        ).encode(),
        [
            (6, "recipe.depht0", "unknown key 'depht0'"),
            (None, "", "... and 4,750 more issues not shown; fix the ones above first"),
        ],
    ),
    "nesting_100k_flow": (
        lambda: ("# lists nested 100,000 deep\nx: " + "[" * 100_000 + "]" * 100_000).encode(),
        [(2, "", "nest")],
    ),
    "comments_5mb_then_typo": (
        lambda: (
            "# 5 MB of comments, then one mistake on the last line\n"
            + "# "
            + "-" * 97
            + "\n"
            + ("#" + " lorem ipsum" * 8 + "\n") * 50_000
            + "name: t\narchitectures:\n  wrn: {depth: 16}\nsearch: {algorithm: TPE}\n"
        ).encode(),
        [(50_006, "search.algorithm", "did you mean 'tpe'?")],
    ),
    "value_5mb": (
        lambda: ("# one value of ~5 MB\nname: " + "x" * 4_900_000 + "\n").encode(),
        [(2, "name", "a value of 4,900,000 characters")],
    ),
    "over_5mib": (
        lambda: ("# more than 5 MiB\n" + "#" * (5 * 2**20)).encode(),
        [(None, "", "the file is larger than 5 MiB")],
    ),
    "nul_byte": (
        lambda: b"# a NUL byte in a value\nname: t\x00x\narchitectures:\n  wrn: {depth: 16}\n",
        [(2, "", "character #x0000 is not allowed in YAML")],
    ),
    "latin1_bytes": (
        lambda: "# saved as Latin-1\nname: t\ntracking: {experiment: caf\xe9}\n".encode("latin-1"),
        [(3, "", "the file is not UTF-8 text: byte 0xe9 at column 27")],
    ),
}


def _expectations(path: Path) -> list[tuple[int | None, str, str]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _EXPECT.match(line)
        if m:
            lineno, key, fragment = m.groups()
            line = None if lineno == "-" else int(lineno)
            out.append((line, "" if key == "-" else key, fragment))
    return out


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    expected: list[tuple[int | None, str, str]]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    folder = tmp_path_factory.mktemp("hostile")
    cases = {}
    for name, (build, expected) in _GENERATED.items():
        path = folder / f"{name}.yaml"
        path.write_bytes(build())
        cases[name] = Case(name, path, expected)
    return cases


ALL = [*HOSTILE, *_GENERATED]


def _case(name: str, generated: dict[str, Case]) -> Case:
    if name in generated:
        return generated[name]
    path = BAD / f"{name}.yaml"
    return Case(name, path, _expectations(path))


def _assert_located(case: Case, text: str) -> None:
    lines = text.splitlines()
    for lineno, key, fragment in case.expected:
        prefix = str(case.path) if lineno is None else f"{case.path}:{lineno}"
        prefix += f": {key}: " if key else ": "
        assert any(line.startswith(prefix) and fragment in line for line in lines), (
            f"expected a line starting {prefix!r} containing {fragment!r}, got:\n{text[:3000]}"
        )


# ----------------------------------------------------------------------- corpus


def test_the_hostile_corpus_is_there() -> None:
    assert len(HOSTILE) >= 40 and len(set(HOSTILE)) == len(HOSTILE)
    for name in HOSTILE:
        path = BAD / f"{name}.yaml"
        assert path.is_file(), name
        assert _expectations(path), f"{name}: no '# expect:' line"
        assert path.stat().st_size < 10_000, f"{name}: generate big files in this test instead"


# ------------------------------------------------------------ the validator's own work


@pytest.mark.parametrize("name", ALL)
def test_validator_answers_within_2s_at_the_line(name: str, generated: dict[str, Case]) -> None:
    case = _case(name, generated)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_sweep(case.path)
    seconds = time.perf_counter() - start
    assert seconds < MAX_SECONDS, f"{name}: {seconds:.2f} s"
    text = str(info.value)
    assert len(text.splitlines()) == len(info.value.issues)  # one issue, one line
    _assert_located(case, text)


def test_pure_python_parser_gives_the_same_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libyaml (a PyYAML built without it) the limits hold the same way, slower."""
    monkeypatch.setattr(yaml_lines, "_parser", yaml.SafeLoader)
    for name in HOSTILE:
        case = _case(name, {})
        with pytest.raises(ConfigError) as info:
            load_sweep(case.path)
        _assert_located(case, str(info.value))


def test_dev_zero_is_refused_without_reading_it_all() -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    with pytest.raises(ConfigError, match="larger than 5 MiB"):
        load_sweep("/dev/zero")


# ------------------------------------------------------------------ the command line


@dataclass
class Ran:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    max_rss_mb: float


# Runs one command as its only child and reports that child's own peak RSS. On Linux a
# child's ru_maxrss starts from the RSS of the process it was forked from (the kernel
# carries the pre-exec memory into it), so a command forked straight from this pytest
# process (hundreds of MB once torch and MLflow are imported by other tests) would
# report pytest's size; forked from this small launcher, it reports its own.
LAUNCHER = r"""
import json, os, resource, sys
limit, out, err, *cmd = sys.argv[1:]
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.execv(cmd[0], cmd)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss": usage.ru_maxrss}))
"""


def _run_together(commands: list[list[str]], cwd: Path, env: dict[str, str]) -> Iterator[Ran]:
    """Run ``wrnsweep ARGS`` for each command at once, each under a memory limit, with its
    own peak RSS (measured by :data:`LAUNCHER`)."""
    started = []
    for i, args in enumerate(commands):
        out, err = cwd.parent / f"out{i}", cwd.parent / f"err{i}"
        launcher = [sys.executable, "-S", "-c", LAUNCHER, str(ADDRESS_SPACE), str(out),
                    str(err), str(WRNSWEEP), *args]
        proc = subprocess.Popen(launcher, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                text=True)
        started.append((args, proc, out, err, time.monotonic()))
    # ru_maxrss is KiB on Linux, bytes on macOS.
    per_mb = 2**20 if sys.platform == "darwin" else 2**10
    for args, proc, out, err, start in started:
        try:
            report, _ = proc.communicate(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{args} ran past {PROCESS_TIMEOUT} s")
        measured = json.loads(report.strip().splitlines()[-1])
        yield Ran(
            args,
            measured["code"],
            out.read_text(errors="replace"),
            err.read_text(errors="replace"),
            time.monotonic() - start,
            measured["maxrss"] / per_mb,
        )


@pytest.mark.parametrize("name", ALL)
def test_validate_and_dry_run_exit_2_small_located_and_start_nothing(
    name: str, generated: dict[str, Case], tmp_path: Path
) -> None:
    case = _case(name, generated)
    cwd, store, ray_tmp = tmp_path / "cwd", tmp_path / "store", tmp_path / "raytmp"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_TMPDIR"] = str(ray_tmp)  # a Ray session would create $RAY_TMPDIR/ray
    commands = [
        ["validate", str(case.path)],
        ["launch", str(case.path), "--dry-run", "--storage", str(store)],
    ]
    for ran in _run_together(commands, cwd, env):
        assert ran.returncode == 2, (ran.args, ran.stdout, ran.stderr[-3000:])
        assert "Traceback" not in ran.stderr + ran.stdout, ran.stderr[-3000:]
        assert "bad_alloc" not in ran.stderr and "MemoryError" not in ran.stderr
        _assert_located(case, ran.stderr)
        assert ran.max_rss_mb < MAX_RSS_MB, f"{ran.args[0]}: {ran.max_rss_mb:.0f} MB"
    assert not store.exists()
    assert not ray_tmp.exists()
    assert list(cwd.iterdir()) == []  # no runs/, no mlflow.db, no file made by a YAML tag


# ------------------------------------------------- what a launch would refuse, refused early

# Fits no machine: a trial of 100,000 CPUs (and no cluster to autoscale into).
TOO_BIG = """name: huge
dataset: {name: synthetic, synthetic_size: 64}
architectures:
  resnet:
    depth: 8
resources:
  resnet: {cpu: 100000, gpu: 0}
"""
SMALL = TOO_BIG.replace("cpu: 100000", "cpu: 1")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_validate_and_dry_run_refuse_what_a_launch_here_refuses(tmp_path: Path) -> None:
    """Trial resources beyond this machine (no address), a tracking URI MLflow cannot use or
    reach, storage that is a file or under one, a malformed --address or RAY_ADDRESS: exit 2,
    one line naming the option, variable or FILE:LINE: key, no traceback, nothing written;
    the same file with a cluster address (checked at launch, where it may autoscale) is ok."""
    cwd, ray_tmp = tmp_path / "cwd", tmp_path / "raytmp"
    cwd.mkdir()
    huge, small = tmp_path / "huge.yaml", tmp_path / "small.yaml"
    huge.write_text(TOO_BIG)
    small.write_text(SMALL)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    store = str(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_TMPDIR"] = str(ray_tmp)
    dry = ["launch", str(small), "--dry-run", "--storage", store]
    refused = {
        "validate huge": (["validate", str(huge)],
                          f"{huge}:7: resources.resnet: this machine cannot run a resnet trial "
                          "(cpu=100000, gpu=0)"),
        "dry-run huge": (["launch", str(huge), "--dry-run", "--storage", store],
                         f"{huge}:7: resources.resnet: this machine cannot run"),
        "scheme": ([*dry, "--tracking-uri", "htp://mlflow:5000"],
                   "--tracking-uri: MLflow has no tracking store for 'htp://'"),
        "unreachable": ([*dry, "--tracking-uri", f"http://127.0.0.1:{_closed_port()}"],
                        "--tracking-uri: cannot use the tracking store http://127.0.0.1:"),
        "store under a file": ([*dry, "--tracking-uri", f"sqlite:///{a_file}/mlflow.db"],
                               f"--tracking-uri: cannot create the store {a_file}/mlflow.db"),
        "storage is a file": (["launch", str(small), "--dry-run", "--storage", str(a_file)],
                              f"--storage: {a_file} is a file, not a folder"),
        "storage under a file": (["launch", str(small), "--dry-run", "--storage",
                                  str(a_file / "runs")],
                                 f"--storage: cannot create {a_file}/runs: {a_file} is a file"),
        "address": ([*dry, "--address", "head-node"],
                    "--address: expected auto, local, HOST:PORT or ray://HOST:PORT, "
                    "got 'head-node'"),
        "validate address": (["validate", str(small), "--address", "ray://head:0x10"],
                             "--address: expected auto"),
        "resume address": (["resume", str(tmp_path / "nowhere"), "--address", "ray://"],
                           "--address: expected auto"),
    }
    for ran, (_, want) in zip(_run_together([args for args, _ in refused.values()], cwd, env),
                              refused.values(), strict=True):
        assert ran.returncode == 2, (ran.args, ran.stdout, ran.stderr[-2000:])
        assert ran.stderr.splitlines() == [f"Error: {ran.stderr[7:].strip()}"], ran.stderr
        assert ran.stderr.startswith(f"Error: {want}"), (ran.args, ran.stderr)
        assert ran.stdout == "", ran.stdout

    from_env = {**env, "RAY_ADDRESS": "not an address", "MLFLOW_TRACKING_URI": "mlfow://x"}
    ran, = _run_together([["launch", str(small), "--dry-run", "--storage", store]], cwd,
                         from_env)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    assert ran.stderr.splitlines() == [
        "Error: a launch would be refused:",
        "RAY_ADDRESS: expected auto, local, HOST:PORT or ray://HOST:PORT, got 'not an address'",
        "MLFLOW_TRACKING_URI: MLflow has no tracking store for 'mlfow://' (known: databricks, "
        "databricks-uc, file, http, https, mssql, mysql, postgresql, sqlite, uc)"], ran.stderr

    fine = [["validate", str(huge), "--address", "auto"], ["validate", str(small)],
            ["launch", str(small), "--dry-run", "--storage", store]]
    for ran in _run_together(fine, cwd, env):
        assert ran.returncode == 0, (ran.args, ran.stderr[-2000:])
    assert not Path(store).exists() and not ray_tmp.exists()
    assert list(cwd.iterdir()) == [] and a_file.read_text() == "not a folder\n"
