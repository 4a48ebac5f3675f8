"""discoverd's test kit for plugin authors: the conformance kit and a pytest plugin.

* :mod:`discoverd.testing.conformance`: the contract classes ``RegistryContract`` and
  ``ProxyContract`` that a registry or proxy plugin subclasses to test itself against its real
  server, and their helpers.
* :mod:`discoverd.testing.pytest_plugin`: fixtures (``discoverd_free_port``,
  ``discoverd_backends``, ...), the ``discoverd_conformance`` marker and the policy for missing
  services. It is not loaded unless asked for: ``pytest -p discoverd.testing``, or in the
  top-level ``conftest.py`` of the tests::

      pytest_plugins = ["discoverd.testing"]

Naming this package as a plugin loads :mod:`discoverd.testing.pytest_plugin` (through
``pytest_plugins`` below): one module holds the hooks and fixtures, so naming either module
registers them once. Neither has asserts to rewrite, and a ``conftest.py`` may import them before
it opts in, hence PYTEST_DONT_REWRITE (no "already imported" warning).
"""

import pytest

# The contract checks' asserts get pytest's explanations, whether or not the plugin is loaded.
pytest.register_assert_rewrite("discoverd.testing.conformance")

pytest_plugins = ["discoverd.testing.pytest_plugin"]
