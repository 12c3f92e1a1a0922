"""The sweep's record: a frozen, versioned ``wrnsweep.json`` in the sweep folder.

Every command that opens a sweep folder starts here: which sweep it is, what it
optimises, where its Tune experiment, tracking store and registered model are,
and which rounds it has run (the launch, then ``extend-N``; a ``confirm-N``
round of :mod:`orchestrator.confirm`). :class:`Manifest` is immutable: a step
that changes the record returns a new one (:meth:`Manifest.replace`) and saves
it; nothing else is kept in it (warnings and what a cluster offers belong to the
run that found them, not to the record).

Saved with the paths inside the folder relative to it (``home: "."``, the
storage that holds it ``".."``, its own SQLite store ``sqlite:///./mlflow.db``),
so a folder copied, moved or renamed is read where it is now; folders written
before the format had a number (absolute paths, a bag of ``extra`` fields) still
load. Loaded and saved only here. Standard library only: ``best``, ``report``,
``ui`` and ``confirm`` read it without Ray, Optuna or torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = 2  # 1: the unversioned plan of earlier wrnsweep (absolute paths, "extra")
META_FILE = "wrnsweep.json"
MANIFEST_ARTIFACT = "manifest.json"  # the record as launched, on the sweep's parent run
MODES = ("max", "min")

# How the saved record names "this folder", "the folder holding it" and its own
# SQLite store: paths that stay true when the folder moves.
_HERE, _PARENT, _LOCAL_STORE = ".", "..", "sqlite:///./mlflow.db"


class ManifestError(ValueError):
    """A sweep folder whose record is missing or unreadable (bad input: exit code 2)."""


def is_uri(path: str) -> bool:
    return "://" in path


def objective_text(metric: str, mode: str) -> str:
    """The objective as the parent run's ``metric`` param holds it: ``val_acc (max)``."""
    return f"{metric} ({mode})"


@dataclass(frozen=True)
class Manifest:
    """Everything resolved from the sweep file, the command line and the runs so far."""

    name: str
    sweep_file: str
    storage_path: str  # absolute folder or URI (Tune's storage)
    home: str  # the sweep folder, absolute, where it is now
    tracking_uri: str
    experiment: str
    registered_model: str
    address: str | None
    metric: str
    mode: str  # "max" | "min": derived from the metric by the sweep file's schema
    num_samples: int  # trials of every search round together
    top_k: int
    experiment_id: str | None = None
    parent_run_id: str | None = None
    rounds: tuple[str, ...] = ()  # extend-1, extend-2, ... after the launch's round
    confirm: dict[str, Any] | None = None  # the last confirm round (orchestrator.confirm)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ManifestError(f"mode must be max or min, got {self.mode!r}")

    @property
    def objective(self) -> str:
        return objective_text(self.metric, self.mode)

    @property
    def experiment_path(self) -> str:
        """Tune's experiment folder: the sweep folder itself when storage is local (under
        whatever name the folder has now), else ``<storage URI>/<name>``."""
        if not is_uri(self.storage_path) and Path(self.home).parent == Path(self.storage_path):
            return self.home
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    # -- on disk ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The record as saved: versioned, paths inside the folder relative to it."""
        out: dict[str, Any] = {"format": FORMAT, **dataclasses.asdict(self)}
        out["rounds"] = list(self.rounds)
        home = Path(self.home)
        out["home"] = _HERE
        if not is_uri(self.storage_path) and home.parent == Path(self.storage_path):
            out["storage_path"] = _PARENT
        from orchestrator.store import local_store_path

        if local_store_path(self.tracking_uri) == home / "mlflow.db":
            out["tracking_uri"] = _LOCAL_STORE
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], home: Path) -> Manifest:
        """A saved record (any format) read at ``home``, the folder's present location."""
        fields = _current_format(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ManifestError(f"unknown field(s) {', '.join(unknown)} (written by a newer "
                                "wrnsweep?)")
        try:
            record = cls(**_located(fields, home))
        except TypeError as err:  # a field missing
            raise ManifestError(str(err).replace("__init__()", "the record")) from None
        return record

    def save(self) -> None:
        """Sign and write ``wrnsweep.json`` (atomically: a reader sees the old or the new)."""
        from orchestrator.trust import sign_bytes

        Path(self.home).mkdir(parents=True, exist_ok=True)
        data = (json.dumps(self.to_json(), indent=2) + "\n").encode()
        # Signed before it is written: resume trusts where the record says to connect.
        sign_bytes(self.home, META_FILE, data)
        tmp = Path(self.home) / (META_FILE + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(Path(self.home) / META_FILE)

    @classmethod
    def load(cls, home: str | os.PathLike[str]) -> Manifest:
        """The record of the sweep folder ``home``, wherever the folder is now; its own
        MLflow store re-pointed at its artifacts (``store.relocate_store``)."""
        from orchestrator.store import StoreMovedError, local_store_path, relocate_store

        path = Path(home) / META_FILE
        if not path.exists():
            raise ManifestError(f"{home}: not a wrnsweep sweep folder (no {META_FILE})")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ManifestError(f"{path}: unreadable ({err})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: not a sweep record")
        record = cls.from_json(data, Path(home).resolve())
        store = local_store_path(record.tracking_uri)
        if store is not None and store.parent == Path(record.home) and store.exists():
            try:
                relocate_store(store)
            except StoreMovedError as err:
                raise ManifestError(str(err)) from None
        return record


def _current_format(data: dict[str, Any]) -> dict[str, Any]:
    """Fields of the current format from a saved record of any format."""
    fields = dict(data)
    version = fields.pop("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise ManifestError(f"format {version!r} is newer than this wrnsweep reads "
                            f"({FORMAT}); upgrade wrnsweep")
    if version == 1:  # the unversioned plan: rounds lived in a bag of extras
        extra = fields.pop("extra", None) or {}
        fields["rounds"] = extra.get("rounds", [])
        fields["confirm"] = extra.get("confirm")
    fields["rounds"] = tuple(fields.get("rounds") or ())
    return fields


def _located(fields: dict[str, Any], home: Path) -> dict[str, Any]:
    """The saved record resolved at ``home``. Older folders saved absolute paths: those
    under the folder's former location are mapped to the same place under ``home``."""
    from orchestrator.store import local_store_path

    was = Path(str(fields.get("home", _HERE)))
    out = dict(fields, home=str(home))
    storage = str(fields.get("storage_path", ""))
    if storage == _PARENT or (not is_uri(storage) and was.parent == Path(storage)):
        out["storage_path"] = str(home.parent)
    uri = str(fields.get("tracking_uri", ""))
    if uri == _LOCAL_STORE or (was != Path(_HERE) and local_store_path(uri) == was / "mlflow.db"):
        out["tracking_uri"] = f"sqlite:///{home / 'mlflow.db'}"
    return out
