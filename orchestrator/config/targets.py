"""The forms of the three places a sweep talks to: a Ray address, a tracking URI, storage.

Each rule says what is wrong with a value, or None; the sweep file's checks
(``ray.address``, ``tracking.uri``, ``ray.storage_path``, located at their line)
and the command line's (``--address``, ``--tracking-uri``, ``--storage``, in
``orchestrator.preflight``) use the same rules, so a value refused in one place
is refused in the other. Only the form is checked here (no network, no disk):
whether a server answers and a folder can be made is the preflight's business.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# What Ray's `ray.init(address=...)` joins: "auto" (the cluster `ray start` runs
# here), "local" (a Ray of our own), HOST:PORT (a GCS) or ray://HOST:PORT (Ray Client).
ADDRESS_FORMS = "auto, local, HOST:PORT or ray://HOST:PORT"
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)"
_ADDRESS = re.compile(rf"(?:ray://)?{_HOST}:(?P<port>[0-9]{{1,5}})")

# The tracking stores MLflow 3 opens (mlflow.tracking._tracking_service.utils):
# its REST API, SQLAlchemy databases (dialect[+driver]) and Databricks.
_SERVER_SCHEMES = {"http", "https"}
_DATABASE_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql"}
_OTHER_SCHEMES = {"databricks", "databricks-uc", "uc", "file"}


def address_problem(address: str) -> str | None:
    """What is wrong with a Ray address, or None."""
    if address in ("auto", "local"):
        return None
    if address.startswith(("http://", "https://")):
        return (f"expected {ADDRESS_FORMS}, got {address!r}: that is a Ray Jobs address "
                "(`wrnsweep submit FILE --address ...` sends a sweep there)")
    m = _ADDRESS.fullmatch(address)
    if m is None:
        return f"expected {ADDRESS_FORMS}, got {address!r}"
    if not 0 < int(m["port"]) < 65536:
        return f"port must be within 1-65535, got {m['port']} in {address!r}"
    return None


def tracking_uri_problem(uri: str) -> str | None:
    """What is wrong with the form of an MLflow tracking URI, or None."""
    if not uri.strip():
        return "must not be empty"
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return None  # a plain path: MLflow keeps runs in that folder
    scheme = uri.split(":", 1)[0].lower()
    dialect = scheme.split("+", 1)[0]
    known = sorted(_SERVER_SCHEMES | _DATABASE_SCHEMES | _OTHER_SCHEMES)
    if scheme not in _SERVER_SCHEMES | _OTHER_SCHEMES and dialect not in _DATABASE_SCHEMES:
        return f"MLflow has no tracking store for {scheme + '://'!r} (known: {', '.join(known)})"
    if scheme in _SERVER_SCHEMES:
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError as err:
            return f"not a valid URL ({err}): {uri!r}"
        if not parts.hostname:
            return f"names no server: {uri!r} (e.g. http://HOST:5000)"
    if dialect == "sqlite" and not uri.startswith("sqlite:///"):
        return f"a SQLite URI is sqlite:///relative.db or sqlite:////absolute.db, got {uri!r}"
    return None


def storage_problem(path: str) -> str | None:
    """What is wrong with the form of a storage path (a folder or a URI), or None."""
    if not path.strip():
        return "must not be empty"
    if "://" in path and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://.+", path):
        return f"expected a folder or a URI such as s3://BUCKET/PATH, got {path!r}"
    return None
