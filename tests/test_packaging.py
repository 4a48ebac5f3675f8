"""What the package ships: the licence, a source distribution with the documentation, the
example configuration, the example plugin and the deployment files, a wheel built from that
source distribution, a README that reads right on a package index page, one version."""

from __future__ import annotations

import email.parser
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from discoverd.version import __version__

REPO = Path(__file__).resolve().parents[1]
SDIST_ROOT = f"discoverd-{__version__}"

#: What the source distribution must carry besides the package: every file below these folders
#: of the repository (as git would list them: no caches, no build output) and these files.
SHIPPED_FOLDERS = ("docs", "contrib", "examples")
SHIPPED_FILES = ("README.md", "LICENSE", "CHANGELOG.md", "discoverd.toml", "pyproject.toml")
#: Never in a distribution.
LEFT_OUT = re.compile(r"(^|/)(__pycache__|build|dist|[^/]*\.egg-info)(/|$)|\.py[cod]$")


def _build(kind: str, source: Path, out: Path) -> Path:
    """``setuptools.build_meta.build_<kind>`` run in ``source`` (a subprocess: the backend works
    in the current folder), without build isolation: no package index is needed."""
    code = f"import sys, setuptools.build_meta as backend; print(backend.build_{kind}(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source distribution of this checkout."""
    return _build("sdist", REPO, tmp_path_factory.mktemp("sdist"))


@pytest.fixture(scope="module")
def sdist_names(sdist: Path) -> set[str]:
    """The paths in the source distribution, relative to its top folder."""
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert all(n == SDIST_ROOT or n.startswith(f"{SDIST_ROOT}/") for n in names), names[:5]
    return {n[len(SDIST_ROOT) + 1 :] for n in names if n != SDIST_ROOT}


@pytest.fixture(scope="module")
def wheel(sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The wheel built from the unpacked source distribution (not from the checkout), as pip
    builds it from the index's sdist."""
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    yield _build("wheel", unpacked / SDIST_ROOT, tmp_path_factory.mktemp("wheel"))


def repository_files(folder: str) -> list[str]:
    """The files below ``folder`` that belong to the repository (not caches or build output)."""
    found = []
    for path in sorted((REPO / folder).rglob("*")):
        relative = path.relative_to(REPO).as_posix()
        if path.is_file() and not LEFT_OUT.search(relative):
            found.append(relative)
    return found


# -- the licence


def test_license_file_is_the_mit_licence_of_the_discoverd_authors() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the discoverd authors" in text
    assert "Permission is hereby granted, free of charge" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]


# -- the source distribution


def test_sdist_carries_docs_example_config_examples_and_contrib(sdist_names: set[str]) -> None:
    wanted = [*SHIPPED_FILES]
    for folder in SHIPPED_FOLDERS:
        files = repository_files(folder)
        assert files, f"{folder}/ is empty"
        wanted.extend(files)
    missing = sorted(set(wanted) - sdist_names)
    assert not missing, f"not in the source distribution: {missing}"
    # The guide's files, by name: a folder-wide check passes on an empty folder.
    for name in (
        "docs/deploy.md",
        "contrib/systemd/discoverd.service",
        "contrib/systemd/discoverd-register.service",
        "contrib/systemd/discoverd-discover.service",
        "contrib/systemd/discoverd.env",
        "contrib/docker/Dockerfile",
        "contrib/docker-socket-proxy/haproxy.cfg",
        "examples/discoverd-jsonfile/pyproject.toml",
        "src/discoverd/plugins/haproxy/templates/haproxy.cfg.j2",
    ):
        assert name in sdist_names


def test_sdist_leaves_out_caches_build_output_and_the_test_suite(sdist_names: set[str]) -> None:
    stray = sorted(
        n for n in sdist_names if LEFT_OUT.search(n) and not n.startswith("src/discoverd.egg-info")
    )
    assert not stray, stray
    assert not [n for n in sdist_names if n == "tests" or n.startswith("tests/")]


def test_sdist_metadata_names_the_licence_and_the_version(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        handle = tar.extractfile(f"{SDIST_ROOT}/PKG-INFO")
        assert handle is not None
        info = email.parser.Parser().parsestr(handle.read().decode())
    assert info["Name"] == "discoverd"
    assert info["Version"] == __version__
    assert info["License-Expression"] == "MIT"
    assert info.get_all("License-File") == ["LICENSE"]
    assert info["Description-Content-Type"] == "text/markdown"


# -- the wheel


def test_wheel_built_from_the_sdist_has_package_data_licence_and_entry_points(
    wheel: Path,
) -> None:
    assert wheel.name == f"discoverd-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"discoverd-{__version__}.dist-info/entry_points.txt")
    for name in (
        "discoverd/py.typed",
        "discoverd/version.py",
        "discoverd/plugins/haproxy/templates/haproxy.cfg.j2",
        "discoverd/plugins/nginx/templates/nginx.conf.j2",
        f"discoverd-{__version__}.dist-info/licenses/LICENSE",
    ):
        assert name in names, name
    # The deployment files and the team's test launchers are not part of the installed package.
    assert not [n for n in names if n.startswith(("contrib/", "docs/", "tests/"))]
    text = entry_points.decode()
    assert "discoverd = discoverd.cli:main" in text
    assert "[discoverd]" in text and "haproxy = discoverd.plugins.haproxy" in text
    assert "pytest11" not in text  # the conformance kit's pytest plugin loads only when asked


# -- the README on a package index page


LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(?P<target>\S+)", re.MULTILINE)
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*\b(?:href|src)\s*=\s*["'](?P<target>[^"']+)""")
CODE_PATH = re.compile(r"`((?:docs|examples|contrib|bench|scripts)/[^`\s]*)`")


def _outside_code(text: str) -> str:
    """``text`` without its fenced code blocks and code spans (where brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def test_readme_has_no_relative_link() -> None:
    """A package index renders README.md away from the repository: a relative link
    (``docs/x.md``) would point nowhere there. Documents are named as paths in code spans
    instead, which the source distribution carries (next test)."""
    text = _outside_code((REPO / "README.md").read_text())
    targets = [m.group("target") for m in LINK.finditer(text)]
    targets += [m.group("target") for m in REFERENCE.finditer(text)]
    targets += [m.group("target") for m in HTML_LINK.finditer(text)]
    relative = [t for t in targets if not re.match(r"(https?://|mailto:|#)", t)]
    assert not relative, f"relative links in README.md: {relative}"


def test_paths_the_readme_names_exist_and_are_shipped(sdist_names: set[str]) -> None:
    named = CODE_PATH.findall((REPO / "README.md").read_text())
    assert "docs/configuration.md" in named
    for path in named:
        target = REPO / path.rstrip("/")
        assert target.exists(), f"README.md names {path}, which does not exist"
        if path.startswith(("docs/", "examples/", "contrib/")):
            prefix = path.rstrip("/")
            assert any(n == prefix or n.startswith(prefix + "/") for n in sdist_names), path


# -- one version


def test_the_version_is_written_once() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "discoverd.version.__version__"
    }
    result = subprocess.run(
        [sys.executable, "-m", "discoverd", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip().endswith(__version__)
    # No other Python file of the package spells it out.
    spelled = [
        path.relative_to(REPO).as_posix()
        for path in (REPO / "src").rglob("*.py")
        if path.name != "version.py"
        and re.search(rf"""["']{re.escape(__version__)}["']""", path.read_text())
    ]
    assert not spelled, spelled
