"""What resume and extend may load from a sweep folder (orchestrator.trust, the searcher's journal).

No Ray cluster here: the signing key and signatures against real files; the
CLI run on folders whose pickles would create a file when unpickled (the file
must never appear); the searcher driven the way Tune drives it (``suggest``,
``on_trial_result``, ``on_trial_complete``, ``save_to_dir`` / ``restore_from_dir``)
against a real Optuna journal. A real sweep's --trust round trip is in
tests/test_sweep_e2e.py; the journal across a real extension in tests/test_extend.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from orchestrator import trust
from orchestrator.config import load_sweep
from orchestrator.search import JOURNAL_FILE, TRIAL_ATTR, create_searcher, restored_seed
from orchestrator.sweep import META_FILE, SWEEP_FILE, make_manifest, trusted_manifest

ROOT = Path(__file__).resolve().parents[1]
TWO_ARCH = ROOT / "tests" / "sweeps" / "two_arch.yaml"
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))


@pytest.fixture(autouse=True)
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This user's key lives under a config folder of the test's own."""
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


# -- the key and the signatures --------------------------------------------------------
def test_key_is_made_private_on_first_signing_and_never_by_a_check(tmp_path: Path,
                                                                   config_home: Path) -> None:
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "tuner.pkl").write_bytes(b"state")
    with pytest.raises(trust.UntrustedFile, match="signed nothing yet"):
        trust.check_folder(folder, str(folder))
    assert not config_home.exists()  # checking created no key

    trust.sign_folder(folder, str(folder))
    key = config_home / "wrnsweep" / "trust.key"
    assert trust.key_path() == key
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert len(key.read_bytes()) == trust.KEY_BYTES
    trust.check_folder(folder, str(folder))  # signed: passes


def test_a_key_others_can_read_is_refused(config_home: Path) -> None:
    trust.load_key(create=True)
    trust.key_path().chmod(0o644)
    with pytest.raises(trust.TrustError, match="readable or writable by others"):
        trust.load_key(create=False)


def test_a_signature_covers_the_content_and_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    (folder / "trial-1").mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"tuner")
    (folder / "trial-1" / "error.pkl").write_bytes(b"error")
    (folder / "experiment_state-x.json").write_text("{}")
    (folder / "result.json").write_text("{}")  # plain JSON: needs no signature
    (folder / "trial-1" / "params.pkl").write_bytes(b"x")  # written by Tune, never read
    assert trust.sign_folder(folder, str(folder)) == 3
    trust.check_folder(folder, str(folder))

    (folder / "trial-1" / "error.pkl").write_bytes(b"errors")
    with pytest.raises(trust.UntrustedFile, match=r"trial-1/error\.pkl: changed since"):
        trust.check_folder(folder, str(folder))
    (folder / "trial-1" / "error.pkl").write_bytes(b"error")
    trust.check_folder(folder, str(folder))

    # A signed file under another name is not signed there.
    shutil.copy(folder / "tuner.pkl", folder / "callback-states-x.pkl")
    with pytest.raises(trust.UntrustedFile, match=r"callback-states-x\.pkl: not signed"):
        trust.check_folder(folder, str(folder))


def test_another_users_signatures_do_not_count(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "tuner.pkl").write_bytes(b"tuner")
    (folder / "search_gen_state-x.json").write_bytes(b"gen")
    trust.sign_folder(folder, str(folder))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "someone-else"))
    trust.load_key(create=True)
    with pytest.raises(trust.UntrustedFile, match=r"another key .*\(and 1 more file"):
        trust.check_folder(folder, str(folder))


@pytest.mark.parametrize("content", [b"", b"not json", b"[]", b'{"files": 3}',
                                     b'{"key": 1, "files": {"tuner.pkl": "x"}}'])
def test_a_malformed_signatures_file_signs_nothing(tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "tuner.pkl").write_bytes(b"tuner")
    trust.load_key(create=True)
    (folder / trust.SIGNATURES_FILE).write_bytes(content)
    with pytest.raises(trust.UntrustedFile, match=r"tuner\.pkl"):
        trust.check_folder(folder, str(folder))


def test_state_signer_signs_staging_and_carries_no_key(tmp_path: Path) -> None:
    """Tune asks callbacks for their state after writing its snapshot into the staging
    folder and before copying it out: get_state signs what is there (with the round's
    prefix), says it has no state, and pickles (into tuner.pkl) without the key."""
    staging, home = tmp_path / "staging", tmp_path / "sweep"
    (staging / "wrn-1").mkdir(parents=True)
    home.mkdir()
    (staging / "experiment_state-s.json").write_text('{"trial_data": []}')
    (staging / "search_gen_state-s.json").write_bytes(b"gen")
    (staging / "wrn-1" / "error.pkl").write_bytes(b"error")
    (staging / "wrn-1" / "params.pkl").write_bytes(b"params")
    (staging / ".abc-tmp-searcher-state-s.json").write_bytes(b"half written")

    class FakeTrial:
        local_experiment_path = str(staging)

    signer = trust.StateSigner(str(home), "extend-1/")
    signer.on_step_begin(0, [FakeTrial()])
    assert signer.get_state() is None
    signed = json.loads((home / trust.SIGNATURES_FILE).read_text())["files"]
    assert set(signed) == {"extend-1/experiment_state-s.json",
                           "extend-1/search_gen_state-s.json", "extend-1/wrn-1/error.pkl"}
    # Copied as Tune copies it: the round's folder checks.
    shutil.copytree(staging, home / "extend-1")
    trust.check_folder(home, str(home))

    blob = pickle.dumps(signer)
    assert trust.load_key(create=False) not in blob
    again = pickle.loads(blob)
    assert (again.home, again.prefix) == (str(home), "extend-1/")


# -- a folder whose pickles would run code ---------------------------------------------------
class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appears if anything unpickles it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _signed_sweep_folder(tmp_path: Path) -> Path:
    """A sweep folder as launch leaves it: plan and sweep file signed by this user."""
    cfg = load_sweep(TWO_ARCH)
    plan = make_manifest(cfg, sweep_file=str(TWO_ARCH), storage=str(tmp_path / "runs"))
    plan = plan.replace(experiment_id="1", parent_run_id="0" * 32)
    plan.save()  # signs wrnsweep.json
    source = cfg.source_text.encode()
    trust.sign_bytes(plan.home, SWEEP_FILE, source)
    (Path(plan.home) / SWEEP_FILE).write_bytes(source)
    return Path(plan.home)


def _payload(relpath: str, marker: Path) -> bytes:
    blob = pickle.dumps(_CreatesFile(marker))
    if relpath.startswith("experiment_state-"):
        # Tune's trial states are cloudpickle blobs inside the JSON.
        return json.dumps({"trial_data": [[{"_type": "CLOUDPICKLE_FALLBACK",
                                            "value": blob.hex()}, "{}"]],
                           "runner_data": {}}).encode()
    return blob


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


PAYLOAD_FILES = ["tuner.pkl", "searcher-state-2026-01-01_00-00-00.pkl",
                 "search_gen_state-2026-01-01_00-00-00.json",
                 "experiment_state-2026-01-01_00-00-00.json", "wrn-0001/error.pkl",
                 "extend-1/tuner.pkl"]


@pytest.mark.parametrize("relpath", PAYLOAD_FILES)
def test_resume_and_extend_refuse_an_unsigned_pickle_before_unpickling_it(
        tmp_path: Path, relpath: str) -> None:
    home = _signed_sweep_folder(tmp_path)
    marker = tmp_path / "pwned"
    (home / relpath).parent.mkdir(parents=True, exist_ok=True)
    (home / relpath).write_bytes(_payload(relpath, marker))
    before = _snapshot(home)
    for args in (["resume", str(home)], ["extend", str(home), "--num-samples", "1"]):
        ran = subprocess.run([WRNSWEEP, *args], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": ""})
        assert ran.returncode == 2, ran.stdout + ran.stderr
        lines = ran.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), ran.stderr
        assert f"{home / relpath}: not signed by this user's wrnsweep" in lines[0]
        assert f"`wrnsweep {args[0]} --trust {home}" in lines[0]
        assert "Traceback" not in ran.stdout + ran.stderr
        assert ran.stdout == ""  # nothing started: no "resuming" line
        assert not marker.exists()  # refused before anything was unpickled
        assert _snapshot(home) == before  # nothing written


def test_a_changed_plan_is_refused(tmp_path: Path) -> None:
    """wrnsweep.json says which Ray to join and which store to write: an edited one
    (here pointing the sweep at another cluster) is refused like a pickle."""
    home = _signed_sweep_folder(tmp_path)
    meta = json.loads((home / META_FILE).read_text())
    meta["address"] = "203.0.113.9:6379"
    (home / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"wrnsweep\.json: changed since .*--trust"):
        trusted_manifest(str(home), "resume")


def test_trust_signs_the_folder_as_it_is_without_loading_it(tmp_path: Path) -> None:
    """--trust is the user's word for the folder: it signs what is there (reading bytes,
    unpickling nothing), and the next resume checks without it."""
    home = _signed_sweep_folder(tmp_path)
    marker = tmp_path / "pwned"
    (home / "tuner.pkl").write_bytes(_payload("tuner.pkl", marker))
    with pytest.raises(ValueError, match="--trust"):
        trusted_manifest(str(home), "resume")
    plan = trusted_manifest(str(home), "resume", vouch=True)
    assert plan.home == str(home)
    trusted_manifest(str(home), "resume")  # signed now
    assert not marker.exists()


# -- the searcher's state: a journal and JSON, no pickle -----------------------------------------
def _searcher(cfg: Any, journal: Path) -> Any:
    limiter, _ = create_searcher(cfg, study_name="s", journal=str(journal))
    return limiter.searcher


def _result(epoch: int, total: int, value: float) -> dict[str, Any]:
    return {"val_acc": value, "training_iteration": epoch, "epoch": epoch,
            "total_epochs": total}


def _study(journal: Path) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(
        str(journal))))


def test_searcher_restores_from_its_journal_and_continues_the_same_study(tmp_path: Path) -> None:
    cfg = load_sweep(TWO_ARCH)
    journal, state = tmp_path / JOURNAL_FILE, tmp_path / "experiment"
    state.mkdir()
    first = _searcher(cfg, journal)
    assert not journal.exists()  # building a searcher writes nothing
    for tid in ("a", "b", "c"):
        first.suggest(tid)
    first.on_trial_result("a", _result(1, 3, 0.2))
    first.on_trial_result("a", _result(3, 3, 0.4))
    first.on_trial_complete("a", _result(3, 3, 0.4))  # ran to the end
    first.on_trial_result("b", _result(1, 3, 0.1))
    first.on_trial_complete("b", _result(1, 3, 0.1))  # stopped by the scheduler
    first.on_trial_result("c", _result(1, 3, 0.3))  # still running at the snapshot
    first.save_to_dir(str(state), session_str="s1")
    first.suggest("d")  # asked after the snapshot: Tune will not know it after a crash

    assert [p.name for p in state.iterdir()] == ["searcher-state-s1.json"]
    assert json.loads((state / "searcher-state-s1.json").read_text())["trials"] == {
        "a": 0, "b": 1, "c": 2}
    before = [(t.number, t.params, t.state) for t in _study(journal).trials]

    restored = _searcher(cfg, journal)
    restored.restore_from_dir(str(state))
    trials = _study(journal).trials
    assert [(t.number, t.params) for t in trials] == [(n, p) for n, p, _ in before]
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED,
                                         TrialState.RUNNING, TrialState.FAIL]
    # The running trial goes on as the same Optuna trial; a new one gets the next number.
    restored.on_trial_result("c", _result(2, 3, 0.35))
    restored.on_trial_complete("c", _result(3, 3, 0.5))
    restored.suggest("e")
    trials = _study(journal).trials
    assert trials[2].state == TrialState.COMPLETE and trials[2].value == 0.5
    assert trials[2].intermediate_values == {1: 0.3, 2: 0.35, 3: 0.5}
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert trials[4].state == TrialState.RUNNING


def test_a_trial_told_after_the_snapshot_keeps_what_optuna_was_told(tmp_path: Path) -> None:
    """The driver died after telling Optuna a trial's end, before Tune's next snapshot:
    Tune runs the trial again, and Optuna keeps its first outcome without an error."""
    cfg = load_sweep(TWO_ARCH)
    journal, state = tmp_path / JOURNAL_FILE, tmp_path / "experiment"
    state.mkdir()
    first = _searcher(cfg, journal)
    first.suggest("a")
    first.save_to_dir(str(state), session_str="s1")
    first.on_trial_complete("a", _result(3, 3, 0.4))

    restored = _searcher(cfg, journal)
    restored.restore_from_dir(str(state))
    restored.on_trial_result("a", _result(1, 3, 0.1))
    restored.on_trial_complete("a", _result(3, 3, 0.6))
    # (the study also holds TPE's second starting point, waiting)
    (trial,) = [t for t in _study(journal).trials if t.user_attrs.get(TRIAL_ATTR) == "a"]
    assert (trial.state, trial.value) == (TrialState.COMPLETE, 0.4)


def test_restored_sampler_is_seeded_from_the_seed_and_trial_count(tmp_path: Path) -> None:
    """Two restores of one folder suggest the same; an extension does not replay the
    launch's random draws (the seed changes with the number of trials)."""
    cfg = load_sweep(TWO_ARCH)
    journal, state = tmp_path / "a" / JOURNAL_FILE, tmp_path / "a" / "experiment"
    state.mkdir(parents=True)
    first = _searcher(cfg, journal)
    launch = [first.suggest(tid) for tid in ("a", "b")]
    for tid in ("a", "b"):
        first.on_trial_complete(tid, _result(3, 3, 0.3))
    first.save_to_dir(str(state), session_str="s1")
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    suggested = []
    for copy in ("a", "b"):
        searcher = _searcher(cfg, tmp_path / copy / JOURNAL_FILE)
        searcher.restore_from_dir(str(tmp_path / copy / "experiment"))
        suggested.append([searcher.suggest(tid) for tid in ("c", "d")])
    assert suggested[0] == suggested[1]
    assert suggested[0] != launch
    assert restored_seed(1, 2) == restored_seed(1, 2) != restored_seed(1, 3)
    assert restored_seed(None, 2) is None


def test_starting_points_are_enqueued_into_a_new_study_only(tmp_path: Path) -> None:
    cfg = load_sweep(SMOKE)
    assert cfg.search.points_to_evaluate
    journal, state = tmp_path / JOURNAL_FILE, tmp_path / "experiment"
    state.mkdir()
    first = _searcher(cfg, journal)
    first.suggest("a")  # the starting point
    first.on_trial_complete("a", _result(4, 4, 0.5))
    first.save_to_dir(str(state), session_str="s1")

    restored = _searcher(cfg, journal)
    restored.restore_from_dir(str(state))
    restored.suggest("b")
    states = [t.state for t in _study(journal).trials]
    assert states == [TrialState.COMPLETE, TrialState.RUNNING]  # no second enqueue


def test_searcher_state_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    cfg = load_sweep(TWO_ARCH)
    state = tmp_path / "experiment"
    state.mkdir()
    (state / "searcher-state-x.json").write_text('{"format": 1, "trials": []}')
    with pytest.raises(RuntimeError, match="not a searcher state"):
        _searcher(cfg, tmp_path / JOURNAL_FILE).restore_from_dir(str(state))
