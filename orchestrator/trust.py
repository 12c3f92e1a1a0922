"""Which sweep folders ``resume`` and ``extend`` may load: signatures under a per-user key.

Ray Tune restores an experiment by unpickling files from the sweep folder:
``tuner.pkl``, the cloudpickled trial states inside ``experiment_state-*.json``,
``search_gen_state-*.json`` (a pickle despite its name), ``callback-states-*.pkl``
and a trial's ``error.pkl``. Unpickling runs whatever code the file names, so a
folder someone hands you (a shared drive, an archive next to a paper) would run
their code on resume. wrnsweep therefore signs each such file it leaves behind
with an HMAC-SHA256 under a secret key of this user, kept outside every sweep
folder, and ``resume``/``extend`` check every signature before Tune reads
anything. The searcher's Optuna study is not among them: it lives in a JSON-lines
journal (:mod:`orchestrator.search`), which cannot run code.

Key: ``$XDG_CONFIG_HOME/wrnsweep/trust.key`` (``~/.config/wrnsweep/trust.key``
by default), 32 random bytes, created 0600 in a 0700 folder the first time
something is signed. Checking never creates it.

Signatures: ``<sweep folder>/wrnsweep.signatures``, JSON: the key's id and, per
file (its path relative to the sweep's experiment folder), the digests of its
last :data:`KEEP` versions. A digest covers the file's path and bytes. The file
holds no secret: without the key nobody can add a digest that checks. Its name
does not end in .json or .pkl, which Tune would copy into its staging folder on
a restore and later copy back, stale, over the live one.

When wrnsweep signs (see ``orchestrator.sweep``):

* its own ``wrnsweep.json`` and ``sweep.yaml`` before writing them (they say
  where resume connects and which data it loads): the digest is on disk first;
* ``tuner.pkl`` just after Tune writes it, when the Tuner is built;
* Tune's periodic snapshots (every few seconds) in the driver's staging folder,
  from :class:`StateSigner`, which Tune calls after writing the snapshot and
  before copying it into the sweep folder: what lands there is already signed,
  so a driver killed with SIGKILL leaves a folder that resumes without ``--trust``;
* everything in the folder after ``fit`` returns, for whatever reason (the sweep
  ended, Ctrl-C, an error);
* everything as it is, on ``--trust``: the user has vouched for the folder.

Under Ray Client (``ray://``) Tune and its callbacks run on the cluster, so the
snapshots are signed there, with that machine's key; the rest is signed here.

Windows in which a file Tune reads can be unsigned or not match, each refused
on resume (``--trust`` goes on): a driver killed in the instant between Tune
writing ``tuner.pkl`` and wrnsweep signing it (before any trial starts); a file
cut short because the driver was killed while Tune copied it into the folder
(Tune could not read it either); a ``callback-states-*.pkl``, which Tune writes
after the callbacks run, until the next snapshot (no wrnsweep callback has state,
so Tune writes none).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback

KEY_FILE = "trust.key"
SIGNATURES_FILE = "wrnsweep.signatures"
# Digests kept per file: a snapshot reaches the sweep folder one copy after it is
# signed, and a slow copy can lag a few snapshots (2 s apart, see sweep._quiet_tune).
KEEP = 16
KEY_BYTES = 32
# Tune's JSON files that embed cloudpickle (experiment state) or are a pickle
# outright (search_gen_state is written by ``_atomic_save`` with cloudpickle).
_PICKLED_JSON_PREFIXES = ("experiment_state-", "search_gen_state-", "basic-variant-state-")
_PARAMS_PICKLE = "params.pkl"  # a trial's config as Tune logged it; see needs_signature
_MAX_SIGNATURES_BYTES = 64 * 2**20  # a larger file is not ours: read as no signatures
_DOMAIN = b"wrnsweep-trust-v1\0"  # separates these digests from any other use of the key


class TrustError(ValueError):
    """The key cannot be used, or a folder's file is not signed (:class:`UntrustedFile`)."""


class UntrustedFile(TrustError):
    """A file that resume would load is not signed by this user's wrnsweep."""


def key_path() -> Path:
    """Where this user's key lives: ``$XDG_CONFIG_HOME/wrnsweep/trust.key``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "wrnsweep" / KEY_FILE


def load_key(*, create: bool) -> bytes | None:
    """This user's key; None when there is none yet and ``create`` is false.

    A key that others can read is refused: anyone who reads it can sign a folder
    that this user's resume would then unpickle.
    """
    path = key_path()
    if create and not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Written whole beside it, then linked into place: link() fails if the key
        # exists, so two processes creating it at once keep one key, and none reads a
        # key another is still writing.
        partial = path.with_name(f".{KEY_FILE}.{os.getpid()}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
            os.link(partial, path)
        except FileExistsError:
            pass
        finally:
            partial.unlink(missing_ok=True)
    try:
        info = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TrustError(f"{path}: the signing key is readable or writable by others; "
                         f"`chmod 600 {path}` (or delete it to make a new one)")
    if len(data) < KEY_BYTES:
        raise TrustError(f"{path}: not a wrnsweep key ({len(data)} bytes, expected "
                         f"{KEY_BYTES}); delete it to make a new one")
    return data


def _key_id(key: bytes) -> str:
    """Names the key in a signatures file without revealing it."""
    return hmac.new(key, _DOMAIN + b"key-id", hashlib.sha256).hexdigest()[:16]


def needs_signature(relpath: str) -> bool:
    """Whether Tune could unpickle this file of an experiment folder.

    Every ``*.pkl`` anywhere (tuner, searcher and callback states, a trial's
    error.pkl), and Tune's state JSON files that carry pickles. Not a trial's
    ``params.pkl``: Tune writes it (JsonLoggerCallback) and never reads it back
    (Ray 2.60: no reader of EXPR_PARAM_PICKLE_FILE), while every snapshot copies
    it into the folder again, so a driver killed mid-copy could leave one cut
    short and refuse a resume for a file nothing loads.
    """
    name = relpath.rsplit("/", 1)[-1]
    if name == _PARAMS_PICKLE:
        return False
    return name.endswith(".pkl") or (name.endswith(".json")
                                     and name.startswith(_PICKLED_JSON_PREFIXES))


class Signatures:
    """The signatures file of one sweep folder, read and written under this user's key."""

    def __init__(self, home: str | os.PathLike[str], key: bytes) -> None:
        self.path = Path(home) / SIGNATURES_FILE
        self._key = key
        self.key_id = _key_id(key)
        self.found_key_id: str | None = None  # the key id the file on disk names
        self.files: dict[str, list[str]] = {}
        self._read()

    def _read(self) -> None:
        # The file comes from the folder, so from anyone: anything malformed counts
        # as no signatures (every file then fails its check), never as an error.
        try:
            if self.path.stat().st_size > _MAX_SIGNATURES_BYTES:
                return
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return
        if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
            return
        self.found_key_id = doc.get("key") if isinstance(doc.get("key"), str) else None
        if self.found_key_id != self.key_id:
            return  # another user's or machine's key: none of its digests can check
        self.files = {name: [d for d in digests if isinstance(d, str)][-KEEP:]
                      for name, digests in doc["files"].items()
                      if isinstance(name, str) and isinstance(digests, list)}

    def digest(self, relpath: str, data: bytes) -> str:
        # The path is inside the MAC: a signed file cannot stand in for another one.
        message = _DOMAIN + relpath.encode() + b"\0" + data
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def add(self, relpath: str, data: bytes) -> bool:
        """Sign one version of a file; whether that changed anything."""
        digest = self.digest(relpath, data)
        digests = self.files.setdefault(relpath, [])
        if digests and digests[-1] == digest:
            return False
        if digest in digests:
            digests.remove(digest)
        digests.append(digest)
        del digests[:-KEEP]
        return True

    def matches(self, relpath: str, data: bytes) -> bool:
        digest = self.digest(relpath, data)
        return any(hmac.compare_digest(digest, d) for d in self.files.get(relpath, ()))

    def save(self) -> None:
        """Write the file atomically: a driver killed meanwhile leaves the old one whole."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{SIGNATURES_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": self.key_id, "files": self.files}, indent=1,
                                  sort_keys=True) + "\n")
        tmp.replace(self.path)


# -- reading a folder, local or remote ---------------------------------------------------
def _filesystem(root: str) -> tuple[Any, str]:
    """pyarrow's filesystem and path of a folder or URI (s3://, gs://), as Tune reads it."""
    import pyarrow.fs

    if "://" not in root:
        return pyarrow.fs.LocalFileSystem(), str(Path(root).resolve())
    return pyarrow.fs.FileSystem.from_uri(root)


def _tree(root: str) -> Iterator[tuple[str, Any, str]]:
    """``(relpath, fs, path)`` of every file under ``root`` whose signature is required."""
    import pyarrow.fs

    fs, base = _filesystem(root)
    selector = pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type != pyarrow.fs.FileType.File:
            continue
        relpath = info.path[len(base):].lstrip("/")
        if needs_signature(relpath):
            yield relpath, fs, info.path


def _read(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.readall()


def _own(home: str | os.PathLike[str], names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    for name in names:
        path = Path(home) / name
        if path.is_file():
            yield name, path.read_bytes()


# -- signing -----------------------------------------------------------------------------
def sign_bytes(home: str | os.PathLike[str], relpath: str, data: bytes) -> None:
    """Sign the content a file is about to get (its digest is on disk before it is)."""
    sigs = Signatures(home, _require(load_key(create=True)))
    if sigs.add(relpath, data):
        sigs.save()


def sign_folder(home: str | os.PathLike[str], experiment: str | None, *,
                own: Iterable[str] = (), only: Iterable[str] | None = None) -> int:
    """Sign files as they are now; how many.

    ``own``: wrnsweep's files in ``home``. ``experiment``: the sweep's Tune
    experiment folder (or URI), every file in it that needs a signature, or only
    the relative paths in ``only``.
    """
    sigs = Signatures(home, _require(load_key(create=True)))
    count = 0
    for name, data in _own(home, own):
        sigs.add(name, data)
        count += 1
    if experiment is not None:
        if only is None:
            files = list(_tree(experiment))
        else:
            fs, base = _filesystem(experiment)
            files = [(rel, fs, f"{base}/{rel}") for rel in only]
        for relpath, fs, path in files:
            try:
                data = _read(fs, path)
            except FileNotFoundError:
                continue
            sigs.add(relpath, data)
            count += 1
    if count:  # nothing to sign: nothing written (not even a folder that is not there)
        sigs.save()
    return count


def _require(key: bytes | None) -> bytes:
    assert key is not None  # load_key(create=True) made one or raised
    return key


# -- checking ----------------------------------------------------------------------------
def check_folder(home: str | os.PathLike[str], experiment: str | None, *,
                 own: Iterable[str] = ()) -> None:
    """Refuse (:class:`UntrustedFile`) a folder with a file this user's wrnsweep did not sign.

    Reads only: nothing is unpickled, nothing written, no key created. The
    message names the first such file and how many there are.
    """
    key = load_key(create=False)
    sigs = Signatures(home, key) if key is not None else None

    def files() -> Iterator[tuple[str, str, bytes]]:  # one file in memory at a time
        for name, data in _own(home, own):
            yield name, str(Path(home) / name), data
        if experiment is not None:
            for relpath, fs, path in _tree(experiment):
                yield relpath, path, _read(fs, path)

    bad = [(shown, _why(sigs, relpath)) for relpath, shown, data in files()
           if sigs is None or not sigs.matches(relpath, data)]
    if bad:
        shown, why = bad[0]
        more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
        raise UntrustedFile(f"{shown}: {why}{more}")


def _why(sigs: Signatures | None, relpath: str) -> str:
    if sigs is None:
        return (f"not signed by this user's wrnsweep (which has signed nothing yet: no key "
                f"at {key_path()})")
    if not sigs.path.exists():
        return f"not signed by this user's wrnsweep (no {SIGNATURES_FILE} in the folder)"
    if sigs.found_key_id != sigs.key_id:
        return "signed under another key than this user's (another user or machine)"
    if relpath not in sigs.files:
        return "not signed by this user's wrnsweep"
    return ("changed since this user's wrnsweep signed it (edited or replaced, or cut short "
            "when a driver was killed while writing it)")


# -- Tune's snapshots ----------------------------------------------------------------------
class StateSigner(Callback):
    """Signs Tune's snapshot in the driver's staging folder each time Tune saves it.

    Tune's ``TuneController.save_to_dir`` writes the experiment state and the
    searcher state into the staging folder, then asks every callback for its
    state (``get_state``), and only afterwards copies the folder into the sweep
    folder. Signing in ``get_state`` therefore signs each snapshot before it
    lands where resume reads it. ``prefix``: this round's folder inside the
    sweep's experiment folder (``""`` for the launch, ``"extend-1/"``...).

    Tune pickles its callbacks into ``tuner.pkl``: the key is never an attribute,
    only the folder, so the object carries no secret.
    """

    def __init__(self, home: str, prefix: str = "") -> None:
        self.home = home
        self.prefix = prefix
        self._staging: str | None = None
        self._stamps: dict[str, tuple[int, int]] = {}  # relpath -> (size, mtime) signed

    def __getstate__(self) -> dict[str, Any]:
        return {"home": self.home, "prefix": self.prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["home"], state["prefix"])  # type: ignore[misc]

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        # Tune gives callbacks no staging path; every trial of the run knows it.
        if self._staging is None and trials:
            self._staging = trials[0].local_experiment_path

    def get_state(self) -> dict | None:
        self.sign_staging()
        return None  # stateless: Tune then writes no callback-states file

    def sign_staging(self) -> None:
        """Sign what changed in the staging folder since the last call."""
        if self._staging is None or not os.path.isdir(self._staging):
            return
        changed: list[tuple[str, str, tuple[int, int]]] = []
        for folder, _, names in os.walk(self._staging):
            for name in names:
                if name.startswith("."):  # Tune's temporary files, renamed into place
                    continue
                path = os.path.join(folder, name)
                relpath = self.prefix + os.path.relpath(path, self._staging).replace(os.sep, "/")
                if not needs_signature(relpath):
                    continue
                try:
                    info = os.stat(path)
                except FileNotFoundError:
                    continue
                stamp = (info.st_size, info.st_mtime_ns)
                if self._stamps.get(relpath) != stamp:
                    changed.append((relpath, path, stamp))
        if not changed:
            return
        sigs = Signatures(self.home, _require(load_key(create=True)))
        for relpath, path, stamp in changed:
            try:
                sigs.add(relpath, Path(path).read_bytes())
            except FileNotFoundError:
                continue
            self._stamps[relpath] = stamp
        sigs.save()
