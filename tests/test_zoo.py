"""Every registered family, the same checks (timm-style), and the registry's promises.

* each family and each choice of its string hyperparameters builds, gives logits
  of the right shape without NaN, and every parameter gets a gradient;
* the registry's paper rows are the parameter counts of what ``build_model`` builds;
* a family's fold (inference form) equals the eval-mode network in float64 and float32;
* one default per hyperparameter: ``build_model``, ``TrainConfig`` and ``train`` agree;
* a family added from outside (one file plus an entry point) shows up in
  ``validate``, ``train --help``, the schema, and trains;
* ``wrnsweep validate`` imports no torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.cli import _train_config
from trainables.config import TrainConfig
from trainables.models import build_model, count_params, family_of, fold
from trainables.models.registry import Family, families, get_family, paper_rows

ROOT = Path(__file__).resolve().parents[1]
WRNSWEEP = Path(sys.executable).with_name("wrnsweep")


def _smallest_depth(family: Family) -> int:
    """The smallest depth the family's rule accepts (the registry's rule, not a table)."""
    rule = family.hparam("depth")
    for depth in range(1, 100):
        try:
            rule.check(depth)
        except ValueError:
            continue
        return depth
    raise AssertionError(f"{family.name}: no depth below 100 is valid")


def _cases() -> list[tuple[str, dict[str, Any]]]:
    """(arch, hparams): each family small, once per choice of each string hyperparameter."""
    cases = []
    for family in families():
        small = {"depth": _smallest_depth(family)}
        cases.append((family.name, small))
        for h in family.hparams:
            for choice in h.choices:
                if choice != h.default:
                    cases.append((family.name, {**small, h.name: choice}))
    return cases


CASES = _cases()
IDS = [f"{arch}-{'-'.join(str(v) for v in hp.values())}" for arch, hp in CASES]


@pytest.mark.parametrize(("arch", "hparams"), CASES, ids=IDS)
def test_every_family_builds_runs_and_trains_every_parameter(arch: str, hparams: dict) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, **hparams)
    x = torch.randn(3, 3, 32, 32)
    out = model.train()(x)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not no_grad, f"{arch}: parameters without gradient: {no_grad}"
    assert torch.isfinite(model.eval()(x)).all()


ROWS = paper_rows()


@pytest.mark.parametrize("row", ROWS, ids=[r.label for r in ROWS])
def test_paper_rows_are_the_parameter_counts_of_the_zoo(row: Any) -> None:
    """10 classes as the registry states; 100 classes adds ``features + 1`` per class."""
    for num_classes in (10, 100):
        with torch.device("meta"):  # shapes only: WRN-28-10 would take seconds to init
            model = build_model(row.arch, num_classes=num_classes, **row.hparams)
        assert count_params(model) == row.params_for(num_classes), (row.label, num_classes)


def test_every_family_has_paper_rows_and_a_published_result() -> None:
    for family in families():
        assert family.rows, family.name
        assert any(r.error for r in family.rows), f"{family.name}: no reported error"


FOLDABLE = [(a, h) for a, h in CASES if hasattr(get_family(a).network_module(), "fold")]


def _trained_statistics(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """BN running statistics away from (0, 1), so folding them is really tested."""
    model = model.to(dtype).train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32, generator=gen, dtype=dtype) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize(("arch", "hparams"), FOLDABLE,
                         ids=[i for i, c in zip(IDS, CASES, strict=True) if c in FOLDABLE])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)],
                         ids=["float64", "float32"])
def test_fold_is_the_eval_network(arch: str, hparams: dict, dtype: torch.dtype,
                                  tol: float) -> None:
    """The folded network computes the eval-mode function in the model's own dtype."""
    torch.manual_seed(0)
    model = _trained_statistics(build_model(arch, num_classes=10, **hparams), dtype)
    folded = fold(model)
    assert all(p.dtype == dtype for p in folded.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(x), folded(x)
    scale = want.abs().max().clamp(min=1.0)
    assert ((got - want).abs().max() / scale).item() < tol


@pytest.mark.parametrize("family", families(), ids=lambda f: f.name)
def test_one_default_per_hyperparameter(family: Family) -> None:
    """build_model, TrainConfig and `train`'s options resolve the same network."""
    expected = family.defaults()
    assert TrainConfig.from_dict({"arch": family.name}).model_hparams() == expected
    from_cli = _train_config({"arch": family.name, "dataset": "digits", "download": False})
    assert from_cli.model_hparams() == expected
    # the same arguments give the same network whichever way they come in
    depth = _smallest_depth(family)
    cfg = _train_config({"arch": family.name, "depth": depth})
    torch.manual_seed(0)
    a = build_model(family.name, num_classes=10, depth=depth)
    torch.manual_seed(0)
    b = build_model(cfg.arch, num_classes=10, **cfg.model_hparams())
    assert family_of(a) is family
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_train_refuses_another_familys_hyperparameter() -> None:
    with pytest.raises(ValueError, match="--shortcut is not a hyperparameter of wrn"):
        _train_config({"arch": "wrn", "shortcut": "B"})


def test_bad_value_names_the_rule_and_the_value() -> None:
    with pytest.raises(ValueError, match=r"WRN depth must be 6n\+4 .*got depth=27"):
        build_model("wrn", num_classes=10, depth=27)
    with pytest.raises(ValueError, match="stride_on must be 'conv1x1' or 'conv3x3'"):
        build_model("preact_resnet", num_classes=10, depth=11, stride_on="1x1")
    with pytest.raises(ValueError, match="init must be 'fan_in' or 'fan_out'"):
        TrainConfig.from_dict({"arch": "diracnet", "init": "xavier"})


# -- a family from outside the package: one file plus its entry point -----------------
TOY_MODULE = '''
"""A toy family: depth 3 convs of 8 channels; depth must be odd."""
from torch import nn

from trainables.models.registry import Family, HParam, PaperRow, Recipe, register


def _odd(depth):
    if depth % 2 == 0:
        raise ValueError(f"toy depth must be odd, got depth={depth!r}")


def build(*, num_classes, depth, gain):
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


register(Family(
    name="toynet", title="Toy net", paper="none", module="toyfam",
    hparams=(HParam("depth", 3, "conv layers", rule=_odd, rule_text="odd"),
             HParam("gain", 1.5, "an unused number")),
    recipe=Recipe(nesterov=False, weight_decay=1e-4, milestones=(0.5,), gamma=0.1,
                  source="made up"),
    rows=(PaperRow("Toy-3", {"depth": 3}, 1_482, 8),),
))
'''


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PYTHONPATH with toyfam.py and an installed-distribution record naming its entry point."""
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "toyfam.py").write_text(TOY_MODULE)
    dist = folder / "toyfam-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyfam\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[wrnsweep.families]\ntoynet = toyfam\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])
    return env


def _run(env: dict[str, str], *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(WRNSWEEP), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_plugin_family_is_in_validate_help_schema_and_trains(toy_env: dict[str, str],
                                                               tmp_path: Path) -> None:
    sweep = tmp_path / "toy.yaml"
    sweep.write_text("name: toy\ndataset: digits\narchitectures:\n"
                     "  toynet: {depth: {choices: [3, 5]}, gain: 2.0}\n")
    ok = _run(toy_env, "validate", str(sweep))
    assert ok.returncode == 0, ok.stderr

    sweep.write_text("name: toy\narchitectures:\n  toynet: {depth: {choices: [3, 4]}}\n")
    bad = _run(toy_env, "validate", str(sweep))
    assert bad.returncode == 2
    assert f"{sweep}:3: architectures.toynet.depth.choices.1: value 4 cannot be built: " \
           "toy depth must be odd, got depth=4" in bad.stderr

    helped = _run(toy_env, "train", "--help")
    assert "toynet" in helped.stdout and "--gain FLOAT" in helped.stdout

    schema = subprocess.run(
        [sys.executable, "-c", "from orchestrator.config.schema import ARCH_SPACES as s; "
         "print(list(s['toynet'].model_fields))"],
        env=toy_env, capture_output=True, text=True, timeout=120, check=True)
    assert schema.stdout.strip() == "['depth', 'gain', 'recipe']"

    trained = _run(toy_env, "train", "--arch", "toynet", "--depth", "3", "--dataset", "digits",
                   "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr
    assert "done: 1,482 parameters" in trained.stdout


def test_validate_imports_no_torch() -> None:
    """`wrnsweep validate` on every shipped sweep checks buildability without torch."""
    files = sorted(str(p) for p in (ROOT / "search_spaces").glob("*.yaml"))
    code = textwrap.dedent(f"""
        import json, sys
        from orchestrator.cli import main
        sys.argv = ["wrnsweep", "validate", "--address", "auto", *{files!r}]
        try:
            main()
        except SystemExit as done:
            print(json.dumps({{"code": done.code, "modules": sorted(sys.modules)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    *report, last = proc.stdout.splitlines()
    result = json.loads(last)
    assert result["code"] == 0, proc.stderr[-2000:]
    assert sum(": ok (" in line for line in report) == len(files)
    assert "trainables.models.families" in result["modules"]  # the rules were used
    heavy = sorted({m for m in result["modules"] if m.split(".")[0] in {"torch", "ray", "mlflow"}})
    assert not heavy, f"validate imported {heavy}"
