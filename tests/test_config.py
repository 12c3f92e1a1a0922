"""The sweep file loader: every shipped file loads, every broken one says where and why.

Each file in ``tests/bad_sweeps/`` starts with a comment saying what is wrong,
followed by one or more lines::

    # expect: LINE KEY | FRAGMENT

meaning that ``str(ConfigError)`` has a line starting ``FILE:LINE: KEY: `` that
contains ``FRAGMENT``. ``-`` stands for "no line" / "no key" (an empty file, a
YAML syntax error).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import (
    ConfigError,
    ConfigIssue,
    MilestoneSpace,
    Param,
    SweepConfig,
    check_cluster_fits,
    load_sweep,
    parse_sweep,
)
from trainables.config import TrainConfig
from trainables.models.registry import get_family, names

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((ROOT / "tests" / "bad_sweeps").glob("*.yaml"))
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))
_EXPECT = re.compile(r"^# expect: (\S+) (\S+) \| (.+)$")

MINIMAL = "name: t\narchitectures:\n  wrn:\n    depth: 16\n"


def _expectations(path: Path) -> list[tuple[int | None, str, str]]:
    out = []
    for line in path.read_text().splitlines():
        m = _EXPECT.match(line)
        if m:
            lineno, key, fragment = m.groups()
            out.append(
                (None if lineno == "-" else int(lineno), "" if key == "-" else key, fragment)
            )
    return out


# ------------------------------------------------------------------ bad files


def test_bad_corpus_is_complete() -> None:
    assert len(BAD) >= 15
    for path in BAD:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "expect:" not in first, f"{path.name}: say what is wrong"
        assert _expectations(path), f"{path.name}: no '# expect:' line"


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_sweep_is_reported_at_its_line_and_key(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    err = info.value
    text = str(err)
    lines = text.splitlines()
    assert len(lines) == len(err.issues)
    assert all(issue.file == str(path) for issue in err.issues)
    for lineno, key, fragment in _expectations(path):
        prefix = str(path) if lineno is None else f"{path}:{lineno}"
        prefix += f": {key}: " if key else ": "
        assert any(line.startswith(prefix) and fragment in line for line in lines), (
            f"expected a line starting {prefix!r} containing {fragment!r}, got:\n{text}"
        )


def test_all_issues_are_reported_in_file_order() -> None:
    with pytest.raises(ConfigError) as info:
        load_sweep(ROOT / "tests" / "bad_sweeps" / "several_issues.yaml")
    lines = [issue.line for issue in info.value.issues]
    assert len(lines) == 4
    assert lines == sorted(lines)  # type: ignore[type-var]


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_sweep(ROOT / "search_spaces" / "does-not-exist.yaml")


def test_sections_that_are_fine_are_still_checked_when_another_is_malformed() -> None:
    text = (
        "name: t\n"
        "architectures:\n"
        "  wrn: {depth: 16, width: {low: 1, hihg: 4}}\n"  # shape error in wrn
        "  resnet: {depth: 21}\n"  # meaning error in resnet
        "search: {metric: val_los}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_sweep(text, "f.yaml")
    got = {(i.line, i.key) for i in info.value.issues}
    assert got == {
        (3, "architectures.wrn.width.hihg"),
        (4, "architectures.resnet.depth"),
        (5, "search.metric"),
    }
    # the misspelt key's "did you mean" replaces a separate "missing 'high'"
    assert "did you mean 'high'?" in str(info.value)


def test_issue_str() -> None:
    assert str(ConfigIssue("a.yaml", 3, "search.mode", "bad")) == "a.yaml:3: search.mode: bad"
    assert str(ConfigIssue("a.yaml", None, "", "empty")) == "a.yaml: empty"


# ------------------------------------------------------------- shipped files


def test_every_shipped_sweep_loads() -> None:
    names = {p.name for p in SHIPPED}
    assert {"wrn.yaml", "resnet.yaml", "diracnet.yaml", "all.yaml", "smoke.yaml"} <= names
    for path in SHIPPED:
        cfg = load_sweep(path)
        assert cfg.source_path == str(path)
        assert cfg.source_text == path.read_text()


def _sample(param: Param | MilestoneSpace) -> Any:
    """One value of the param, as a search would hand it to a trial."""
    if isinstance(param, MilestoneSpace):
        return [param.low + i * param.min_gap for i in range(param.count)]
    if param.kind == "float":
        return param.low
    return param.values()[-1]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_sweep_builds_train_configs(path: Path) -> None:
    """Constants + one sample of every param make a valid TrainConfig for every arch."""
    cfg = load_sweep(path)
    for arch in cfg.arch_names():
        values = {"arch": arch, **cfg.dataset_options(), **cfg.recipe_constants(arch)}
        values.update({name: _sample(p) for name, p in cfg.params_for(arch).items()})
        train = TrainConfig.from_dict(values)
        assert train.extra == {}
        assert train.epochs == cfg.epochs_for(arch)


def test_smoke_sweep_is_small_and_cpu_only() -> None:
    cfg = load_sweep(ROOT / "search_spaces" / "smoke.yaml")
    assert cfg.dataset_options()["dataset"] == "digits"
    assert len(cfg.arch_names()) >= 2
    assert all(cfg.resources_for(a) == {"cpu": 1.0, "gpu": 0.0} for a in cfg.arch_names())
    assert cfg.search.num_samples <= 8 and cfg.recipe_constants("wrn")["epochs"] <= 5


# --------------------------------------------------------- the uniform view


def test_params_for_wrn() -> None:
    cfg = load_sweep(ROOT / "search_spaces" / "wrn.yaml")
    assert cfg.arch_names() == ["wrn"]
    params = cfg.params_for("wrn")
    assert params["depth"] == Param("depth", "categorical", choices=(16, 22, 28, 40))
    assert params["width"] == Param("width", "int", low=2, high=10, step=2)
    assert params["width"].values() == [2, 4, 6, 8, 10]
    assert params["dropout"] == Param("dropout", "float", low=0.0, high=0.5)
    assert params["lr"] == Param("lr", "float", low=0.03, high=0.2, log=True)
    assert params["gamma"] == Param("gamma", "categorical", choices=(0.1, 0.2))
    assert params["weight_decay"] == Param("weight_decay", "constant", value=5e-4)
    assert not params["weight_decay"].searchable
    assert params["milestones"] == MilestoneSpace(count=3, low=0.2, high=0.9, min_gap=0.1)
    with pytest.raises(ValueError, match="float range"):
        params["dropout"].values()


def test_recipe_constants_wrn() -> None:
    cfg = load_sweep(ROOT / "search_spaces" / "wrn.yaml")
    assert cfg.recipe_constants("wrn") == {
        "epochs": 200,
        "batch_size": 128,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "warmup_epochs": 0,
        "label_smoothing": 0.0,
    }
    assert cfg.resources_for("wrn") == {"cpu": 8.0, "gpu": 1.0}
    assert cfg.dataset_options() == {
        "dataset": "cifar10",
        "data_root": None,
        "download": False,
        "synthetic_size": 2048,
    }
    assert cfg.search.mode == "max" and cfg.scheduler.grace_period == 20
    assert cfg.line_of("architectures.wrn.depth") == 12
    assert cfg.line_of("architectures.wrn.depth.no.such.key") == 12


def test_per_arch_recipe_overrides_win() -> None:
    cfg = load_sweep(ROOT / "search_spaces" / "all.yaml")
    resnet, wrn = cfg.recipe_constants("resnet"), cfg.recipe_constants("wrn")
    assert (resnet["weight_decay"], resnet["milestones"], resnet["gamma"]) == (
        1e-4,
        (0.5, 0.75),
        0.1,
    )
    assert resnet["nesterov"] is False and resnet["momentum"] == 0.9  # shared momentum kept
    assert (wrn["weight_decay"], wrn["milestones"], wrn["gamma"]) == (5e-4, (0.3, 0.6, 0.8), 0.2)
    assert cfg.params_for("resnet")["milestones"] == Param(
        "milestones", "constant", value=(0.5, 0.75)
    )
    assert cfg.params_for("resnet")["lr"].kind == "float"  # the shared searched lr
    assert cfg.params_for("resnet")["shortcut"] == Param("shortcut", "constant", value="A")


def test_defaults_and_conveniences() -> None:
    cfg = parse_sweep(
        MINIMAL
        + "dataset: {name: synthetic, synthetic_size: 256}\n"
        + "recipe:\n  weight_decay: 5e-4\n"  # YAML 1.1 reads this as a string
        + "search:\n  metric: val_loss\n  points_to_evaluate: [{depth: 16}]\n"
        + "resources:\n  default: {cpu: 2}\n"
        + "tracking:\n",
        "inline.yaml",
    )
    assert cfg.search.mode == "min"  # derived from the metric
    assert cfg.recipe_constants("wrn") == {"weight_decay": 5e-4}
    assert cfg.resources_for("wrn") == {"cpu": 2.0, "gpu": 0.0}
    assert cfg.dataset_options()["synthetic_size"] == 256
    assert cfg.tracking.top_k == 3 and cfg.ray.address is None
    assert cfg.epochs_for("wrn") == 200  # TrainConfig's default
    with pytest.raises(KeyError):
        cfg.params_for("resnet")
    auto = parse_sweep(MINIMAL + "resources: {default: auto}\n", "auto.yaml")
    assert auto.resources_for("wrn") == "auto"
    assert parse_sweep(MINIMAL, "m.yaml").resources_for("wrn") == {"cpu": 1.0, "gpu": 0.0}


def test_schema_matches_model_hparams() -> None:
    fields = SweepConfig.model_fields["architectures"].annotation.model_fields  # type: ignore[union-attr]
    assert tuple(fields) == names()
    for arch in names():
        space = fields[arch].annotation.__args__[0]  # type: ignore[union-attr]
        hparams = tuple(n for n in space.model_fields if n != "recipe")
        assert hparams == get_family(arch).hparam_names


# --------------------------------------------------------- cluster placement


def test_check_cluster_fits() -> None:
    wrn = load_sweep(ROOT / "search_spaces" / "wrn.yaml")  # wrn: {cpu: 8, gpu: 1}
    assert check_cluster_fits(wrn, [{"CPU": 16.0, "GPU": 8.0}]) == []
    # Enough CPUs on one node and a GPU on another is not enough: a trial is on one node.
    issues = check_cluster_fits(wrn, [{"CPU": 16, "GPU": 0}, {"CPU": 4, "GPU": 1}])
    assert [(i.key, i.line) for i in issues] == [("resources.wrn", wrn.line_of("resources.wrn"))]
    assert "wrn trial (cpu=8, gpu=1)" in issues[0].message
    assert "2 node(s), the largest with 16 CPUs and 1 GPUs" in issues[0].message
    assert str(issues[0]).startswith(f"{wrn.source_path}:{issues[0].line}: resources.wrn: ")
    assert len(check_cluster_fits(wrn, [])) == 1

    resnet = load_sweep(ROOT / "search_spaces" / "resnet.yaml")  # 2 CPU + 0.25 GPU; 4 + 0.5
    issues = check_cluster_fits(resnet, [{"CPU": 2, "GPU": 1}])
    assert [i.key for i in issues] == ["resources.preact_resnet"]
    assert check_cluster_fits(resnet, [{"CPU": 4, "GPU": 0.5}]) == []

    auto = parse_sweep(MINIMAL + "resources: {wrn: auto}\n", "auto.yaml")
    assert check_cluster_fits(auto, [{"CPU": 1}]) == []  # sized at launch
    default = parse_sweep(MINIMAL, "d.yaml")  # {cpu: 1, gpu: 0}
    assert check_cluster_fits(default, [{"CPU": 1}]) == []
    assert [i.key for i in check_cluster_fits(default, [{"GPU": 1}])] == ["resources"]


def test_importing_the_config_does_not_import_torch() -> None:
    code = "import sys, orchestrator.config; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ------------------------------------------------------------ YAML within limits


def test_reader_builds_the_same_data_as_pyyaml() -> None:
    """The limited composer is PyYAML's, event for event: same data for every shipped file."""
    import yaml

    from orchestrator.config.yaml_lines import _compose

    for path in SHIPPED:
        text = path.read_text()
        assert _compose(text, str(path))[0] == yaml.safe_load(text), path.name


def test_anchors_aliases_and_merge_keys_still_work() -> None:
    """Sharing a block with &anchor / *alias / <<: is what aliases are for; it stays allowed."""
    cfg = parse_sweep(
        "name: t\n"
        "recipe: &shared\n"
        "  epochs: 10\n"
        "  lr: {low: 0.01, high: 0.1, log: true}\n"
        "architectures:\n"
        "  wrn:\n"
        "    depth: 16\n"
        "    recipe: *shared\n"
        "  resnet:\n"
        "    depth: 20\n"
        "    recipe:\n"
        "      <<: *shared\n"
        "      epochs: 20\n",
        "anchors.yaml",
    )
    assert cfg.epochs_for("wrn") == 10 and cfg.epochs_for("resnet") == 20
    assert cfg.params_for("resnet")["lr"] == Param("lr", "float", low=0.01, high=0.1, log=True)
    assert cfg.line_of("architectures.wrn.recipe.lr") == 4  # the line of the anchor's text


def test_lists_at_the_limit_load_and_are_checked_in_linear_time() -> None:
    """1,000 choices and 900 starting points (the most a list may hold) load in well under 2 s.

    The duplicate check used to scan the earlier choices for each one (40k choices: 30 s).
    """
    import time

    choices = ", ".join(f"{i / 2000:.4f}" for i in range(1000))
    points = "".join(f"    - {{dropout: {i / 2000:.4f}}}\n" for i in range(900))
    text = (
        "name: t\narchitectures:\n  wrn:\n    depth: 16\n"
        f"    dropout: {{choices: [{choices}]}}\n"
        f"search:\n  points_to_evaluate:\n{points}"
    )
    start = time.perf_counter()
    cfg = parse_sweep(text, "big.yaml")
    assert time.perf_counter() - start < 2.0
    assert len(cfg.params_for("wrn")["dropout"].choices) == 1000
    assert len(cfg.search.points_to_evaluate) == 900


def test_duplicate_choices_compare_as_numbers_within_a_param() -> None:
    """1 and 1.0 are one dropout (both floats once read); a bool is never a depth."""
    with pytest.raises(ConfigError) as info:
        parse_sweep(
            MINIMAL.replace("depth: 16", "depth: 16\n    width: {choices: [1, 2]}")
            + "recipe:\n  lr: {choices: [1, 1.0, 0.5]}\n",
            "d.yaml",
        )
    assert [(i.key, i.message) for i in info.value.issues] == [
        ("recipe.lr.choices.1", "1 appears twice in choices")
    ]
    with pytest.raises(ConfigError) as info:
        parse_sweep("name: t\narchitectures:\n  wrn:\n    depth: {choices: [16, true]}\n", "b.yaml")
    assert [(i.key, i.message) for i in info.value.issues] == [
        ("architectures.wrn.depth.choices.1", "expected an integer, got true")
    ]


_ANCHOR = "a: &a [" + ", ".join(["1"] * 998) + "]\n"  # 999 values


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("x: " + "[" * 15 + "]" * 15, False),  # the top mapping and 15 lists: 16 levels
        ("x: " + "[" * 16 + "]" * 16, True),
        # 4 + 999 + 9 * 999 + 6 = 10,000 values, aliases expanded; one more alias is 10,993
        (_ANCHOR + "b: [" + ", ".join(["*a"] * 9) + "]\nc: 1\nd: 1\ne: 1", False),
        (_ANCHOR + "b: [" + ", ".join(["*a"] * 10) + "]", True),
        ("x: [" + ", ".join(["1"] * 1000) + "]", False),
        ("x: [" + ", ".join(["1"] * 1001) + "]", True),
        ("x: " + "a" * 4096, False),
        ("x: " + "a" * 4097, True),
        (f"x: {2**63 - 1}", False),
        (f"x: {2**63}", True),
    ],
    ids=[
        "depth16",
        "depth17",
        "nodes10k",
        "nodes11k",
        "items1000",
        "items1001",
        "chars4096",
        "chars4097",
        "int63",
        "int64",
    ],
)
def test_limits_are_exact(text: str, refused: bool) -> None:
    """Each limit lets its bound through and refuses one more, at a located key."""
    from orchestrator.config.yaml_lines import _compose

    if refused:
        with pytest.raises(ConfigError) as info:
            _compose(text, "l.yaml")
        (issue,) = info.value.issues
        assert issue.line is not None and issue.key.split(".")[0] in ("x", "b")
    else:
        assert isinstance(_compose(text, "l.yaml")[0], dict)
