"""The proxy contract, :class:`ProxyContract`: subclass it in a test module (see
:mod:`discoverd.testing.conformance` for the outline).

Fixtures the subclass provides:

``make_proxy`` (required) -> :class:`ProxyFactory`
    ``make_proxy()`` returns a *new* ``Proxy`` object of the plugin each call, all managing the
    *same* proxy (same state directory, same process): a second object stands for a restarted
    discoverd. Frontends must listen on 127.0.0.1 (or every interface); other ports the proxy
    needs (a stats page) should be free ports, returned by ``reserved_ports()``. The fixture
    stops the real proxy process at teardown -- ``Proxy.close()`` leaves it running, by contract.

``proxy_probe`` (required) -> :class:`ProxyProbe`
    ``proxy_probe.reload_count()`` returns how many times the *running* proxy has reloaded its
    configuration, measured from the proxy itself rather than from the plugin's objects (HAProxy:
    the master's reload counter in ``show proc``; nginx: the generations of worker pids; a file
    exporter: how many times the file was replaced). It may raise while no proxy runs. It may
    also have ``running_config() -> str`` returning the configuration the proxy runs now, read
    from where the proxy reads it; the kit then checks it after every step.

Class attributes and methods:

``serves_traffic = True``  Set to False for a proxy that carries no traffic (a file exporter):
                           the checks then skip everything that connects to a frontend.
``service_mode = "http"``  The mode of the services the kit builds (``"http"`` or ``"tcp"``).
``traffic_timeout = 30.0``  Deadline for a change to be served, or a removed frontend to close.
``apply_delay_limit = 120.0``  Longest total wait the kit accepts from ``apply_delay()``.
``make_invalid_config(config) -> str``  A candidate the proxy's checker must refuse, made from
                           a valid one; by default the valid text plus a line of nonsense.
                           Override it if that is not invalid for your proxy.

The kit starts its own backends: small HTTP servers on 127.0.0.1 answering ``I am <name>``.
Every apply goes through the core's pipeline: ``render`` -> wait while ``apply_delay()`` asks ->
``validate`` -> ``apply``. After each apply the kit cross-checks the word ``apply`` returned with
the probe: ``"reloaded"`` must be seen as a reload, ``"runtime"`` and ``"unchanged"`` must not.

The checks (each a test method):

- ``test_render_is_deterministic``: the same services in any order render the same text;
  another instance, port, frontend port or service renders another text.
- ``test_rendered_configs_validate``: the renders of no service and of several services pass
  ``validate``.
- ``test_validate_rejects_an_invalid_config``: ``validate`` raises ``ProxyConfigError`` with a
  message, and neither reloads nor changes the running proxy, which keeps serving.
- ``test_apply_starts_the_proxy_and_serves``: the first apply starts the proxy, and each
  frontend answers from every one of its backends.
- ``test_empty_service_set``: the proxy starts with no service; a service added later is served
  and closes again when removed.
- ``test_apply_failure_keeps_the_previous_config`` (traffic only): a candidate whose new frontend
  port is held by another program is refused by ``validate`` or ``apply`` (``PluginError``);
  the previous services stay served, and once the port is free the same candidate applies.
- ``test_unchanged_input_causes_no_reload``: applying the same services again returns
  ``"unchanged"`` and the probe counts no reload.
- ``test_membership_change_is_served``: a backend replaced, a service added, a service removed:
  each change is served afterwards (exactly the new backends answer; a removed frontend closes).
- ``test_reserved_ports``: ``reserved_ports()`` is stable, holds valid ports that the running
  proxy really uses, and a service asking for one is refused before rendering.
- ``test_close_leaves_the_proxy_running``: after ``close()`` the proxy still serves its
  configuration, and a new proxy object adopts it: applying the same services is ``"unchanged"``
  with no reload.
"""

from __future__ import annotations

import errno
import math
import random
import socket
import time
import urllib.error
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import ClassVar

import pytest

from discoverd import PluginError, Proxy, ProxyConfigError
from discoverd.core.assignment import build_services
from discoverd.core.model import Catalog, Mode, Service
from discoverd.testing.conformance.common import (
    HttpBackend,
    ProxyFactory,
    ProxyProbe,
    _Backends,
    _backends,
    _missing,
    fresh_port,
    http_get,
    poll_until,
)

# --------------------------------------------------------------------------------------------
# Proxy contract


def _answer(port: int, timeout: float = 2.0) -> str:
    """The backend name answering on the proxy's ``port`` (``I am <name>``), or raise."""
    body = http_get(f"http://127.0.0.1:{port}/", timeout=timeout).strip()
    if not body.startswith("I am "):
        raise AssertionError(f"unexpected answer on port {port}: {body[:80]!r}")
    return body.removeprefix("I am ")


def _port_in_use(port: int) -> bool:
    """True if something listens on 127.0.0.1:``port`` or holds it on every interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class ProxyContract:
    """The contract every proxy plugin passes; see the module docstring for how to use it."""

    serves_traffic: ClassVar[bool] = True
    #: Checks that mean nothing for a proxy carrying no traffic; the pytest plugin deselects
    #: them (instead of skipping them) when ``serves_traffic`` is False.
    traffic_only_checks: ClassVar[frozenset[str]] = frozenset(
        {"test_apply_failure_keeps_the_previous_config"}
    )
    service_mode: ClassVar[Mode] = "http"
    traffic_timeout: ClassVar[float] = 30.0
    apply_delay_limit: ClassVar[float] = 120.0

    # -- fixtures a subclass provides ------------------------------------------------------

    @pytest.fixture
    def make_proxy(self) -> ProxyFactory:
        _missing(
            "ProxyContract",
            "make_proxy",
            "make_proxy() returning a new Proxy object of your plugin each call, all managing "
            "the same real proxy (one state directory); stop that proxy at teardown",
        )

    @pytest.fixture
    def proxy_probe(self) -> ProxyProbe:
        _missing(
            "ProxyContract",
            "proxy_probe",
            "an object whose reload_count() reads how many times the running proxy reloaded, "
            "from the proxy itself (e.g. HAProxy's `show proc`)",
        )

    def make_invalid_config(self, config: str) -> str:
        """A candidate the proxy's own checker must refuse (default: a line of nonsense)."""
        return config + "\nthis-is-not-a-valid-directive on;\n"

    # -- the kit's own fixtures ------------------------------------------------------------

    @pytest.fixture
    def contract_backends(self) -> Iterator[_Backends]:
        with _backends() as pool:
            yield pool

    # -- helpers ---------------------------------------------------------------------------

    def services(
        self,
        proxy: Proxy,
        wanted: Mapping[str, tuple[int, Sequence[HttpBackend]]],
    ) -> tuple[Service, ...]:
        """Services built as the core builds them: ``{name: (frontend port, backends)}``."""
        instances = [
            backend.instance(name, port)
            for name, (port, backends) in wanted.items()
            for backend in backends
        ]
        assignment = build_services(
            Catalog(instances=tuple(instances)),
            default_mode=self.service_mode,
            reserved_ports=proxy.reserved_ports(),
        )
        built = {s.name for s in assignment.services}
        missing = [name for name, (_, backends) in wanted.items() if backends and name not in built]
        assert not missing, f"services refused by build_services: {assignment.problems}"
        return assignment.services

    def ports(self, proxy: Proxy, count: int) -> list[int]:
        """``count`` free frontend ports, none of them reserved by ``proxy``."""
        reserved = proxy.reserved_ports()
        return [fresh_port(reserved) for _ in range(count)]

    def _reload_count(self, probe: ProxyProbe) -> int | None:
        try:
            return int(probe.reload_count())
        except Exception:
            return None  # no proxy runs yet

    def check_running_config(self, probe: ProxyProbe, expected: str, when: str) -> None:
        """If the probe can read the running configuration, it must be ``expected``."""
        reader = getattr(probe, "running_config", None)
        if reader is None:
            return
        running = reader()
        assert running == expected, (
            f"{when}: the proxy does not run the expected configuration "
            f"(running {len(running or '')} characters, expected {len(expected)})"
        )

    def wait_apply_delay(self, proxy: Proxy, config: str, services: Sequence[Service]) -> None:
        """Wait as long as ``apply_delay`` asks, as the core does (within apply_delay_limit)."""
        deadline = time.monotonic() + self.apply_delay_limit
        while True:
            delay = proxy.apply_delay(config, services)
            assert isinstance(delay, int | float) and math.isfinite(delay) and delay >= 0, (
                f"apply_delay() returned {delay!r}; expected a finite number of seconds >= 0"
            )
            if delay == 0:
                return
            if time.monotonic() + delay > deadline:
                pytest.fail(
                    f"apply_delay() still asks to wait {delay:g}s after "
                    f"{self.apply_delay_limit:g}s of waiting"
                )
            time.sleep(min(delay, 5.0))

    def apply(self, proxy: Proxy, probe: ProxyProbe, services: Sequence[Service]) -> str:
        """The core's pipeline: render -> apply_delay -> validate -> apply, cross-checked."""
        config = proxy.render(services)
        self.wait_apply_delay(proxy, config, services)
        proxy.validate(config)
        before = self._reload_count(probe)
        result = proxy.apply(config, services)
        assert result in ("started", "reloaded", "runtime", "unchanged"), (
            f"apply() returned {result!r}; expected started, reloaded, runtime or unchanged"
        )
        if before is not None and result == "reloaded":
            poll_until(
                lambda: (self._reload_count(probe) or 0) > before,
                self.traffic_timeout,
                f"the probe to count the reload apply() reported (count was {before})",
            )
        elif before is not None and result in ("runtime", "unchanged"):
            after = self._reload_count(probe)
            assert after == before, (
                f"apply() returned {result!r} but the proxy reloaded (reload count "
                f"{before} -> {after})"
            )
        elif result == "started":
            assert self._reload_count(probe) is not None, (
                "apply() returned 'started' but proxy_probe.reload_count() cannot read the "
                "running proxy"
            )
        self.check_running_config(probe, config, f"after apply() returned {result!r}")
        return result

    def wait_served(self, port: int, names: Iterable[str]) -> None:
        """Wait until the frontend on ``port`` answers from exactly the backends ``names``."""
        expected = set(names)
        rounds = 4 * max(len(expected), 1)

        def one_round() -> bool:
            seen = {_answer(port) for _ in range(rounds)}
            if seen != expected:
                raise AssertionError(f"answers came from {sorted(seen)}")
            return True

        poll_until(
            one_round, self.traffic_timeout, f"port {port} to be served by {sorted(expected)}"
        )

    def wait_closed(self, port: int) -> None:
        """Wait until nothing answers HTTP on ``port`` any more."""

        def closed() -> bool:
            try:
                _answer(port, timeout=1.0)
            except (OSError, urllib.error.URLError, AssertionError):
                return True
            return False

        poll_until(closed, self.traffic_timeout, f"the frontend on port {port} to close")

    # -- the checks ------------------------------------------------------------------------

    def test_render_is_deterministic(
        self, make_proxy: ProxyFactory, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b, c, d = (contract_backends(n) for n in ("a", "b", "c", "d"))
        p1, p2, p3 = self.ports(proxy, 3)
        base = {"web": (p1, [a, b]), "api": (p2, [c])}
        services = list(self.services(proxy, base))
        text = proxy.render(services)
        rng = random.Random(7)
        for _ in range(5):
            shuffled = list(self.services(proxy, base))
            rng.shuffle(shuffled)
            assert proxy.render(shuffled) == text, (
                "the same services in another order rendered another configuration"
            )
        variants = {
            "one instance less": {"web": (p1, [a]), "api": (p2, [c])},
            "another backend": {"web": (p1, [a, d]), "api": (p2, [c])},
            "another frontend port": {"web": (p3, [a, b]), "api": (p2, [c])},
            "one more service": {**base, "db": (p3, [d])},
        }
        for what, wanted in variants.items():
            assert proxy.render(self.services(proxy, wanted)) != text, (
                f"{what} rendered the same configuration"
            )

    def test_rendered_configs_validate(
        self, make_proxy: ProxyFactory, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b, c = (contract_backends(n) for n in ("a", "b", "c"))
        p1, p2 = self.ports(proxy, 2)
        proxy.validate(proxy.render([]))
        proxy.validate(proxy.render(self.services(proxy, {"web": (p1, [a, b]), "api": (p2, [c])})))

    def test_validate_rejects_an_invalid_config(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b = contract_backends("a"), contract_backends("b")
        p1, p2 = self.ports(proxy, 2)
        running = self.services(proxy, {"web": (p1, [a])})
        self.apply(proxy, proxy_probe, running)
        candidate = proxy.render(self.services(proxy, {"web": (p1, [a]), "api": (p2, [b])}))
        invalid = self.make_invalid_config(candidate)
        assert invalid != candidate, "make_invalid_config() returned the valid configuration"
        before = self._reload_count(proxy_probe)
        with pytest.raises(ProxyConfigError) as refused:
            proxy.validate(invalid)
        assert str(refused.value).strip(), "ProxyConfigError carries no message for the operator"
        assert self._reload_count(proxy_probe) == before, "validate() reloaded the running proxy"
        self.check_running_config(proxy_probe, proxy.render(running), "after a refused candidate")
        if self.serves_traffic:
            self.wait_served(p1, ["a"])

    def test_apply_starts_the_proxy_and_serves(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b, c = (contract_backends(n) for n in ("a", "b", "c"))
        p1, p2 = self.ports(proxy, 2)
        services = self.services(proxy, {"web": (p1, [a, b]), "api": (p2, [c])})
        result = self.apply(proxy, proxy_probe, services)
        assert result != "unchanged", "the first apply() with no proxy running did nothing"
        assert proxy.needs_check(proxy.render(services)), (
            "needs_check() is False while the proxy runs: a candidate would reach it unchecked"
        )
        if self.serves_traffic:
            self.wait_served(p1, ["a", "b"])
            self.wait_served(p2, ["c"])

    def test_empty_service_set(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a = contract_backends("a")
        (p1,) = self.ports(proxy, 1)
        assert self.apply(proxy, proxy_probe, []) != "unchanged"
        assert self._reload_count(proxy_probe) is not None, "no proxy runs after applying []"
        self.apply(proxy, proxy_probe, self.services(proxy, {"web": (p1, [a])}))
        if self.serves_traffic:
            self.wait_served(p1, ["a"])
        self.apply(proxy, proxy_probe, [])
        if self.serves_traffic:
            self.wait_closed(p1)

    def test_apply_failure_keeps_the_previous_config(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        if not self.serves_traffic:
            pytest.skip(f"{type(self).__name__}.serves_traffic is False: no port to conflict on")
        proxy = make_proxy()
        a, b = contract_backends("a"), contract_backends("b")
        p1, p2 = self.ports(proxy, 2)
        running = self.services(proxy, {"web": (p1, [a])})
        self.apply(proxy, proxy_probe, running)
        self.wait_served(p1, ["a"])
        wanted = self.services(proxy, {"web": (p1, [a]), "api": (p2, [b])})
        config = proxy.render(wanted)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            squatter.bind(("127.0.0.1", p2))  # another program holds the new frontend's port
            squatter.listen(1)
            self.wait_apply_delay(proxy, config, wanted)
            try:
                proxy.validate(config)
            except ProxyConfigError:
                pass  # refused up front: fine
            else:
                with pytest.raises(PluginError):
                    proxy.apply(config, wanted)
            self.wait_served(p1, ["a"])
            self.check_running_config(
                proxy_probe, proxy.render(running), "after a configuration the proxy refused"
            )
        result = self.apply(proxy, proxy_probe, wanted)
        assert result != "unchanged", (
            "once the port was free, apply() of the refused configuration returned 'unchanged': "
            "the plugin took the failed configuration for the running one"
        )
        self.wait_served(p1, ["a"])
        self.wait_served(p2, ["b"])

    def test_unchanged_input_causes_no_reload(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b, c = (contract_backends(n) for n in ("a", "b", "c"))
        p1, p2 = self.ports(proxy, 2)
        wanted = {"web": (p1, [a, b]), "api": (p2, [c])}
        self.apply(proxy, proxy_probe, self.services(proxy, wanted))
        if self.serves_traffic:
            self.wait_served(p1, ["a", "b"])
        before = self._reload_count(proxy_probe)
        again = list(self.services(proxy, wanted))
        random.Random(3).shuffle(again)
        for _ in range(2):
            assert self.apply(proxy, proxy_probe, again) == "unchanged", (
                "applying the configuration that already runs did not return 'unchanged'"
            )
        assert self._reload_count(proxy_probe) == before, "unchanged input caused a reload"

    def test_membership_change_is_served(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b, c, d = (contract_backends(n) for n in ("a", "b", "c", "d"))
        p1, p2 = self.ports(proxy, 2)
        steps: list[tuple[str, Mapping[str, tuple[int, Sequence[HttpBackend]]]]] = [
            ("start", {"web": (p1, [a, b])}),
            ("a backend replaced", {"web": (p1, [b, c])}),
            ("a service added", {"web": (p1, [b, c]), "api": (p2, [d])}),
            ("a backend added", {"web": (p1, [a, b, c]), "api": (p2, [d])}),
            ("a service removed", {"web": (p1, [a, b, c])}),
        ]
        for what, wanted in steps:
            result = self.apply(proxy, proxy_probe, self.services(proxy, wanted))
            assert result != "unchanged", f"{what}: apply() returned 'unchanged'"
            if not self.serves_traffic:
                continue
            for _, (port, backends) in wanted.items():
                self.wait_served(port, [x.name for x in backends])
            if what == "a service removed":
                self.wait_closed(p2)

    def test_reserved_ports(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        reserved = proxy.reserved_ports()
        assert isinstance(reserved, frozenset), "reserved_ports() must return a frozenset"
        assert all(isinstance(p, int) and 1 <= p <= 65535 for p in reserved), (
            f"reserved_ports() holds invalid ports: {sorted(reserved)}"
        )
        assert make_proxy().reserved_ports() == reserved, "reserved_ports() is not stable"
        a = contract_backends("a")
        (p1,) = self.ports(proxy, 1)
        self.apply(proxy, proxy_probe, self.services(proxy, {"web": (p1, [a])}))
        if not reserved:
            return
        port = min(reserved)
        claim = build_services(
            Catalog(instances=(a.instance("squatter", port), a.instance("web", p1))),
            default_mode=self.service_mode,
            reserved_ports=proxy.reserved_ports(),
        )
        assert [s.name for s in claim.services] == ["web"], (
            "a service asking for a reserved port was not refused"
        )
        proxy.validate(proxy.render(claim.services))
        if self.serves_traffic:
            unused = [p for p in sorted(reserved) if not _port_in_use(p)]
            assert not unused, (
                f"reserved_ports() names {unused}, which the running proxy does not use"
            )

    def test_close_leaves_the_proxy_running(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b = contract_backends("a"), contract_backends("b")
        (p1,) = self.ports(proxy, 1)
        services = self.services(proxy, {"web": (p1, [a, b])})
        self.apply(proxy, proxy_probe, services)
        config = proxy.render(services)
        proxy.close()
        before = self._reload_count(proxy_probe)
        assert before is not None, "no proxy runs any more after close()"
        self.check_running_config(proxy_probe, config, "after close()")
        if self.serves_traffic:
            self.wait_served(p1, ["a", "b"])
        successor = make_proxy()  # a restarted discoverd adopts the running proxy
        assert successor.render(services) == config
        result = self.apply(successor, proxy_probe, services)
        assert result == "unchanged", (
            f"a new proxy object applying the running configuration returned {result!r}; it "
            "should adopt the running proxy"
        )
        assert self._reload_count(proxy_probe) == before
        if self.serves_traffic:
            self.wait_served(p1, ["a", "b"])
