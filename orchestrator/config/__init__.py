"""The sweep file: schema, loader, and errors that point at file, line and key.

One YAML file describes a whole sweep (see ``search_spaces/README.md``)::

    cfg = load_sweep("search_spaces/wrn.yaml")   # raises ConfigError
    cfg.arch_names()          # ['wrn']
    cfg.params_for("wrn")     # {'depth': Param(kind='categorical', ...), 'lr': ...}
    cfg.recipe_constants("wrn")  # {'epochs': 200, 'batch_size': 128, ...}

Validation happens in two passes so that every problem is reported at once:

1. *Shape* -- pydantic models (``extra="forbid"``, strict ints) check keys and
   types. Each error ``loc`` is translated into a dotted key, union tags are
   dropped, and unknown keys get a ``difflib`` suggestion.
2. *Meaning* -- plain functions check ranges, the recipe, the scheduler against
   the epochs, resources, the starting points, and that every value a model
   parameter can take is buildable (``trainables.models.check_hparams``).
   When pass 1 fails, each top-level section is re-validated alone so that the
   sections that are fine still get pass 2.

Line numbers come from the YAML node tree (``yaml.compose``), recorded per dotted
key; an issue on a key that is absent (a missing field) falls back to its parent.

The modules, each importing only from those listed before it:

- ``errors``: :class:`ConfigIssue`, :class:`ConfigError`, and how values are
  written in messages.
- ``yaml_lines``: the YAML loader that records the line of every key.
- ``schema``: the pydantic models of the file, :class:`SweepConfig`, and the
  uniform :class:`Param` / :class:`MilestoneSpace` view of a search space.
- ``messages``: pass 1, pydantic errors rewritten as ``dotted.key: message``.
- ``checks``: pass 2, and :func:`check_cluster_fits`.
- ``loading``: :func:`load_sweep` and :func:`parse_sweep`, which run both passes.

Nothing heavy is imported at module level: the CLI imports this package to print
``--help``, and ``trainables.models`` pulls in torch, so it is imported only
inside the buildability check.
"""

from __future__ import annotations

from orchestrator.config.checks import (
    MAX_GPUS_PER_NODE,
    MAX_MILESTONES,
    SWEEP_NAME,
    SWEEP_NAME_RULE,
    check_cluster_fits,
)
from orchestrator.config.errors import ConfigError, ConfigIssue
from orchestrator.config.loading import load_sweep, parse_sweep
from orchestrator.config.schema import METRICS, MilestoneSpace, Param, SweepConfig

__all__ = [
    "MAX_GPUS_PER_NODE",
    "MAX_MILESTONES",
    "METRICS",
    "SWEEP_NAME",
    "SWEEP_NAME_RULE",
    "ConfigError",
    "ConfigIssue",
    "MilestoneSpace",
    "Param",
    "SweepConfig",
    "check_cluster_fits",
    "load_sweep",
    "parse_sweep",
]
