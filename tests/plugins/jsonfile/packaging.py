"""Installing plugin packages for a test without touching the shared environment.

``install_package`` runs ``pip install --no-deps --target <dir>`` on a copy of a package's source
tree: the venv's site-packages stay as they are (other test runs share them), and a process with
``PYTHONPATH=<dir>`` (or an in-process ``on_sys_path(<dir>)``) sees the package's dist-info, hence
its ``discoverd`` entry points, exactly as if it were installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "discoverd-jsonfile"


def can_build_without_isolation() -> bool:
    """``--no-build-isolation`` builds with this interpreter's setuptools: it must be there, and
    build wheels (setuptools 70.1 or later does on its own, older ones need ``wheel``)."""
    try:
        version = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return False
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    return numbers >= (70, 1) or importlib.util.find_spec("wheel") is not None


def install_package(source: Path, target: Path) -> Path:
    """Build and install the package in ``source`` into ``target``; return ``target``.

    The source tree is copied first, so the build leaves no ``build/`` or ``*.egg-info`` in it.
    When this interpreter cannot build the wheel itself (see ``can_build_without_isolation``),
    pip builds it in an isolated environment, which fetches setuptools from the package index.
    """
    scratch = target.parent / f"{target.name}-src"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(
        source,
        scratch,
        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".*cache"),
    )
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--target",
        str(target),
    ]
    if can_build_without_isolation():
        command += ["--no-build-isolation", "--no-index"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    result = subprocess.run(
        [*command, str(scratch)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, f"pip install {source.name} failed:\n{result.stderr}"
    shutil.rmtree(scratch, ignore_errors=True)
    return target


def write_package(root: Path, name: str, version: str, entry_points: dict[str, str],
                  modules: dict[str, str]) -> Path:  # fmt: skip
    """Write a minimal setuptools project into ``root``: ``modules`` maps a module name to its
    source, ``entry_points`` an entry-point name (group ``discoverd``) to a module."""
    root.mkdir(parents=True, exist_ok=True)
    eps = "\n".join(f'"{k}" = "{v}"' for k, v in entry_points.items())
    listed = ", ".join(f'"{m}"' for m in modules)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "{version}"

            [project.entry-points.discoverd]
            """
        )
        + eps
        + f"\n\n[tool.setuptools]\npy-modules = [{listed}]\n"
    )
    for module, text in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(text))
    return root


@contextmanager
def on_sys_path(path: Path) -> Iterator[None]:
    """Put ``path`` first on ``sys.path`` for the block; afterwards restore ``sys.path`` and
    forget the modules imported from ``path``."""
    saved = list(sys.path)
    before = set(sys.modules)
    sys.path.insert(0, str(path))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = saved
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if origin.startswith(str(path)):
                del sys.modules[name]
        importlib.invalidate_caches()


def subprocess_env(*paths: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``discoverd`` child process that sees the packages in ``paths``:
    none of the caller's DISCOVERD_*/ETCD_* variables, ``PYTHONPATH`` set to ``paths``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCOVERD_", "ETCD_"))}
    env.pop("HOST_IP", None)
    env.pop("PYTHONPATH", None)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    env.update(extra)
    return env
