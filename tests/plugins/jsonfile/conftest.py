"""The example third-party plugin (examples/discoverd-jsonfile), installed for this session.

``jsonfile_site`` is a directory holding the installed package and its dist-info (built once per
session by pip, see :mod:`tests.plugins.jsonfile.packaging`); ``jsonfile_manager`` is a plugin
manager built, in process, with that directory on ``sys.path``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from discoverd.core.manager import PluginManager, get_plugin_manager
from tests.plugins.jsonfile.packaging import EXAMPLE, install_package, on_sys_path


@pytest.fixture(scope="session")
def jsonfile_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where ``discoverd-jsonfile`` is installed (put it on PYTHONPATH or sys.path to use it)."""
    return install_package(EXAMPLE, tmp_path_factory.mktemp("jsonfile") / "site")


@pytest.fixture
def jsonfile_manager(jsonfile_site: Path) -> Iterator[PluginManager]:
    """A plugin manager that found the installed example through its entry point."""
    with on_sys_path(jsonfile_site):
        yield get_plugin_manager(disabled=())
