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

Before either pass the file is read within limits (``yaml_lines``): at most 5 MiB,
16 levels of nesting, 1,000 items in a list or mapping, 10,000 values with every
alias expanded, 4,096 characters in a value, integers within 64 bits. A file that
crosses one (an alias bomb, a list of 200,000 choices) is refused at the value
that crossed it, in milliseconds, and every check after that is linear in the
file's size: any file under 5 MB is answered within 2 s.

Line numbers come from the YAML node tree, recorded per dotted key; an issue on
a key that is absent (a missing field) falls back to its parent.

The modules, each importing only from those listed before it:

- ``errors``: :class:`ConfigIssue`, :class:`ConfigError`, and how values are
  written in messages.
- ``yaml_lines``: the YAML reader: its limits, and the line of every key.
- ``schema``: the pydantic models of the file, :class:`SweepConfig`, and the
  uniform :class:`Param` / :class:`MilestoneSpace` view of a search space.
- ``messages``: pass 1, pydantic errors rewritten as ``dotted.key: message``.
- ``checks``: pass 2, and :func:`check_cluster_fits`.
- ``loading``: :func:`load_sweep` and :func:`parse_sweep`, which run both passes.

Nothing heavy is imported: the CLI imports this package to print ``--help``, and
the buildability rules come from the family registry, which imports no torch.
"""

from __future__ import annotations

from orchestrator.config.checks import (
    MAX_GPUS_PER_NODE,
    MAX_MILESTONES,
    MAX_NAME_LENGTH,
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
    "MAX_NAME_LENGTH",
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
