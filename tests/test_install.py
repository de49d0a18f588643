"""adapters/ installs as tokcompress.adapters, never as a top-level ``adapters`` (a PyPI project owns that name).

Both a regular and an editable install of a copy of this checkout are made into temporary folders,
then imported by a fresh interpreter that sees only them plus the environment's dependencies.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import importlib.util, site, sys
{activate}
sys.path.append({deps!r})  # dependencies only: the environment's own .pth files stay unprocessed
import tokcompress, tokcompress.adapters
print(tokcompress.__file__)
print(tokcompress.adapters.__file__)
print(importlib.util.find_spec("adapters") is None)
print(len(tokcompress.adapters.supported_models()))
"""


def _copy_checkout(dest: Path) -> Path:
    src = dest / "src"
    for name in ("tokcompress", "adapters"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _probe(activate: str) -> list[str]:
    code = PROBE.format(deps=sysconfig.get_paths()["purelib"], activate=activate)
    out = subprocess.run([sys.executable, "-S", "-c", code], check=True, capture_output=True, text=True, cwd="/")
    return out.stdout.split()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    return _copy_checkout(tmp_path_factory.mktemp("install"))


def test_regular_install_imports_tokcompress_adapters(checkout: Path):
    target = checkout.parent / "regular"
    _pip(str(checkout), "--target", str(target))
    assert not (target / "adapters").exists()
    pkg, adapters, no_top_level, n = _probe(f"sys.path.insert(0, {str(target)!r})")
    assert Path(pkg) == target / "tokcompress" / "__init__.py"
    assert Path(adapters) == target / "tokcompress" / "adapters" / "__init__.py"
    assert no_top_level == "True" and int(n) > 0


def test_editable_install_imports_tokcompress_adapters(checkout: Path):
    prefix = checkout.parent / "editable"
    _pip("-e", str(checkout), "--prefix", str(prefix))
    site_dir = next(prefix.glob("lib/python*/site-packages"))
    pkg, adapters, no_top_level, n = _probe(f"site.addsitedir({str(site_dir)!r})")
    assert Path(pkg) == checkout / "tokcompress" / "__init__.py"
    assert Path(adapters) == checkout / "adapters" / "__init__.py"
    assert no_top_level == "True" and int(n) > 0
