"""Packaging (issue 17): the wheel's metadata (SPDX license and its file, one version, extras, URLs,
entry points), the base install that writes events with no dependency at all, one clear line naming
the extra a command needs, and the container image: its entry points checked against pyproject.toml
and the Kubernetes manifests always, built and run where a container engine answers."""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from outbox_relay.cli import app as relay_app
from relay.schema_version import head_revision
from relay.shared.version import __version__

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "relay", "control", "clients", "outbox_relay")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
MIGRATION_SCRIPTS = sorted((ROOT / "relay" / "migrations" / "versions").glob("*.py"))
EXTRAS = {"control", "cli", "relay", "consumer", "otlp", "all", "embedded", "bench", "dev"}
IMAGE_UID = 10001


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH: what runs must come from the installed wheel, not from this checkout."""
    return {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (so the checkout gets no build/ or egg-info)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(source)],
        check=True, capture_output=True, text=True, env=_clean_env(), timeout=300,
    )
    [built] = out.glob("outbox_relay-*.whl")
    return built


def _metadata(wheel: Path) -> tuple[email.message.Message, list[str], str]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    return metadata, names, entry_points


def test_wheel_metadata(wheel: Path) -> None:
    metadata, names, entry_points = _metadata(wheel)
    assert metadata["Version"] == __version__
    assert wheel.name.startswith(f"outbox_relay-{__version__}-")
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert set(metadata.get_all("Provides-Extra")) >= EXTRAS
    # The base install has no dependency at all: every requirement belongs to an extra.
    requirements = metadata.get_all("Requires-Dist")
    assert requirements and all("extra ==" in requirement for requirement in requirements), requirements
    assert any(url.startswith("Source, ") for url in metadata.get_all("Project-URL"))
    assert "License :: " not in " ".join(metadata.get_all("Classifier"))  # the SPDX expression says it
    assert "Programming Language :: Python :: 3.11" in metadata.get_all("Classifier")
    assert "outbox-relay = outbox_relay.console:main" in entry_points
    assert "outboxctl = clients.console:main" in entry_points
    assert not [name for name in names if name.startswith(("devtools/", "tests/", "bench/"))]
    assert "relay/sql/queries.sql" in names and "control/queries.sql" in names
    # A running relay reads the shipped revisions from these scripts (relay.schema_version).
    assert MIGRATION_SCRIPTS and {f"relay/migrations/versions/{p.name}" for p in MIGRATION_SCRIPTS} <= set(names)


def test_the_base_install_writes_events_and_names_the_extra_a_command_needs(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, text=True, env=_clean_env(), timeout=300,
    )

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, env=_clean_env(), cwd=tmp_path, timeout=120, check=False)

    for script in SCRIPTS:
        result = run(str(venv / "bin" / script), "--version")
        assert (result.returncode, result.stdout.strip()) == (0, f"{script} {__version__}"), result

    writer = run(str(python), "-c", "from clients import enqueue, aenqueue, enqueue_many, OutboxEvent, lease, lease_sync")
    assert writer.returncode == 0, writer.stderr

    revision = run(str(python), "-c", "from relay.schema_version import head_revision; print(head_revision())")
    assert (revision.returncode, revision.stdout.strip()) == (0, head_revision()), revision

    for argv, extra in (((str(venv / "bin" / "outbox-relay"), "run"), "relay"), ((str(venv / "bin" / "outboxctl"), "status"), "cli")):
        result = run(*argv)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result
        assert f"needs the '{extra}' extra" in lines[0] and f"pip install 'outbox-relay[{extra}]'" in lines[0], lines


# --- the container image ---------------------------------------------------------------------------


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _exec_form(instruction: str) -> list[str]:
    found = re.findall(rf"^{instruction}\s+(\[.*\])\s*$", _dockerfile(), re.MULTILINE)
    assert len(found) == 1, f"one {instruction} in exec form expected, found {found}"
    value: list[str] = json.loads(found[0])
    return value


def _relay_commands() -> set[str]:
    return {command.name or command.callback.__name__ for command in relay_app.registered_commands if command.callback}


def test_the_dockerfile_runs_the_console_scripts_as_non_root_read_only() -> None:
    text = _dockerfile()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 2, "multi-stage: a builder and a runtime"
    entrypoint, command = _exec_form("ENTRYPOINT"), _exec_form("CMD")
    assert entrypoint == ["outbox-relay"] and entrypoint[0] in SCRIPTS
    assert command == ["run"] and command[0] in _relay_commands()
    assert re.search(rf"^USER {IMAGE_UID}:{IMAGE_UID}$", text, re.MULTILINE)
    assert "PYTHONDONTWRITEBYTECODE=1" in text and "WORKDIR /tmp" in text
    installed = re.search(r"outbox_relay-\*\.whl\)\[([a-z,]+)\]", text)
    assert installed and {"relay", "cli"} <= set(installed[1].split(","))
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1:2] == ["*"] or "*" in ignored  # only what the build copies goes to the engine
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for name in copied.split():
            assert f"!{name.rstrip('/')}/" in ignored or f"!{name}" in ignored, name


def _containers() -> list[tuple[str, dict[str, object], dict[str, object]]]:
    """(file, pod spec, container) of every workload in deploy/kubernetes."""
    found = []
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document or document.get("kind") not in ("Deployment", "Job", "StatefulSet", "CronJob"):
                continue
            pod = document["spec"]["template"]["spec"]
            found += [(path.name, pod, container) for container in pod["containers"]]
    return found


def test_the_kubernetes_manifests_run_the_image_as_the_dockerfile_says() -> None:
    containers = _containers()
    assert {name for name, _, _ in containers} >= {"deployment.yaml", "migrate-job.yaml"}
    for name, pod, container in containers:
        image = str(container["image"])
        repository, _, tag = image.rpartition(":")
        assert repository.endswith("/outbox-relay") and tag == __version__, (name, image)
        argv = [*container.get("command", []), *container.get("args", [])]  # type: ignore[misc]
        assert argv[0] in SCRIPTS and argv[1] in _relay_commands(), (name, argv)
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == IMAGE_UID, name  # type: ignore[index]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name  # type: ignore[index]
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}  # type: ignore[attr-defined]
        assert "/tmp" in mounts, name


def _container_engine() -> str | None:
    for engine in ("docker", "podman"):
        if shutil.which(engine) is None:
            continue
        probe = subprocess.run([engine, "info"], capture_output=True, text=True, timeout=60, check=False)
        if probe.returncode == 0:
            return engine
    return None


def test_the_image_builds_and_runs_its_entry_points(tmp_path: Path) -> None:
    engine = _container_engine()
    if engine is None:
        pytest.skip("no container engine answers `docker info` / `podman info` (a client without a daemon): "
                    "the image is not built here; its entry points are checked by the tests above")
    tag = f"outbox-relay-test:{__version__}"
    subprocess.run([engine, "build", "-t", tag, str(ROOT)], check=True, timeout=1800)
    try:
        base = [engine, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--user", f"{IMAGE_UID}:{IMAGE_UID}"]
        for argv, expected in (
            ([tag, "--version"], f"outbox-relay {__version__}"),
            (["--entrypoint", "outboxctl", tag, "--version"], f"outboxctl {__version__}"),
            ([tag, "migrate", "--help"], "Upgrade the schema"),
        ):
            result = subprocess.run([*base, *argv], capture_output=True, text=True, timeout=300, check=False)
            assert result.returncode == 0 and expected in result.stdout, result
    finally:
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True, timeout=300, check=False)
