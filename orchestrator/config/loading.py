"""The entry points: read a sweep file and run both validation passes on it.

:func:`parse_sweep` composes the YAML with its line map (``yaml_lines``),
validates the shape with pydantic (pass 1, messages from ``messages``), then the
meaning (pass 2, ``checks``), and raises one :class:`ConfigError` listing every
issue in file order. The :class:`SweepConfig` it returns keeps the source text,
path and line map: the sweep logs the file as written, and later issues (such as
``check_cluster_fits`` at launch) still point at lines.

:func:`load_sweep` reads at most ``MAX_FILE_BYTES`` (5 MiB) and refuses a larger
file before parsing anything; the other limits are the YAML reader's
(``yaml_lines``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from orchestrator.config.checks import _check_meaning, _Checker, _Sections, _sections_alone
from orchestrator.config.errors import ConfigError, ConfigIssue
from orchestrator.config.schema import SweepConfig
from orchestrator.config.yaml_lines import MAX_FILE_BYTES, _compose


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file; raises :class:`ConfigError` listing every issue."""
    filename = str(path)
    try:
        with open(path, "rb") as f:
            # One byte past the limit tells "too large" without reading all of it
            # (a 10 GB log passed by mistake, /dev/zero).
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(filename, None, "", "no such file")]) from None
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue(filename, None, "", f"cannot read the file: {exc.strerror or exc}")]
        ) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            [
                ConfigIssue(
                    filename,
                    None,
                    "",
                    f"the file is larger than {MAX_FILE_BYTES // 2**20} MiB: a sweep file is "
                    "a few KB of YAML; is this the right file?",
                )
            ]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            [
                ConfigIssue(
                    filename,
                    line,
                    "",
                    f"the file is not UTF-8 text: byte 0x{raw[exc.start]:02x} at column "
                    f"{column} cannot be decoded (save the file as UTF-8)",
                )
            ]
        ) from None
    return parse_sweep(text, filename)


def parse_sweep(text: str, filename: str = "<string>") -> SweepConfig:
    """Validate sweep YAML ``text``; ``filename`` is only used in messages."""
    data, lines, dup_issues = _compose(text, filename)
    ck = _Checker(filename, lines)
    ck.issues.extend(dup_issues)
    cfg: SweepConfig | None
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as exc:
        cfg = None
        ck.add_validation_error(exc)
        parts = _sections_alone(data)
    else:
        parts = _Sections.of(cfg)
    _check_meaning(ck, parts)
    if ck.issues or cfg is None:
        raise ConfigError(ck.report())
    cfg._source_text = text
    cfg._source_path = filename
    cfg._lines = lines
    return cfg
