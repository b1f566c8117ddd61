"""The package installs (pyproject.toml) and imports from outside the repository."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_installs_whole_and_imports_from_any_directory(tmp_path):
    pytest.importorskip("setuptools")  # the build backend; --no-build-isolation uses this environment's
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout, whose tracked files are copied")
    src = tmp_path / "src"  # a copy of what git tracks, so that the build leaves nothing in the repository
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True)
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "space").rglob("*.py"))
    assert sorted(p.relative_to(site).as_posix() for p in (site / "space").rglob("*.py")) == modules
    assert not (site / "stages").exists() and not (site / "tests").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", "import space, space.data.rooms; print(space.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == site / "space" / "__init__.py"
