"""``DockerSource``: the running containers of one Docker daemon, as service instances.

A snapshot is one ``GET /containers/json`` (running containers, their labels, published ports and
status) plus one inspect per container never seen before: a container's environment and the image
name it was started with cannot change while its id stays the same, so inspect results are cached
by id and forgotten when the container is gone. Ports are always taken from the fresh list, since
a restarted container keeps its id but may get new host ports. Each TCP instance of a container
with an address of its own also carries that address and the private port (the internal
metadata ``container_address``): the discover role of this host dials it instead of the
published port, skipping docker-proxy (core option ``local_direct``).

The watch streams the daemon's container events and *wakes* the core, which then takes a full
snapshot (level-triggered). The events also tell what the list cannot yet: a container sent its
stop signal (``kill``, the start of ``docker stop``) or one that exited (``die``) while the list
still shows it running. Those are reported by :meth:`DockerSource.stopping` (the interface's
``Source.stopping``), so the register role removes them before the process exits. A missed
``kill`` event costs that early removal (the proxies then find the instance gone instead of
draining it); a missed ``die`` costs the time until the list stops showing the container.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import docker.utils
import requests
import urllib3

from discoverd import (
    CheckTarget,
    ContainerSpec,
    ExposurePolicy,
    Notify,
    PluginContext,
    PortBinding,
    Problem,
    ServiceInstance,
    Source,
    SourceSnapshot,
    Unavailable,
    ValidationError,
    exception_chain,
    instances_for,
    parse_env,
    with_container_address,
)
from discoverd.plugins.docker.config import DockerConfig

log = logging.getLogger("discoverd.docker")

#: Where the SDK connects when neither the ``host`` option nor ``DOCKER_HOST`` says otherwise.
DEFAULT_URL = "unix:///var/run/docker.sock"

#: Container events that may change the snapshot; each one wakes the core.
WATCHED_ACTIONS = ("destroy", "die", "health_status", "kill", "pause", "start", "stop", "unpause")

# Everything a call to the daemon may raise when the daemon misbehaves or cannot be reached.
_DAEMON_ERRORS: tuple[type[BaseException], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)
_TIMEOUTS: tuple[type[BaseException], ...] = (
    requests.exceptions.Timeout,
    urllib3.exceptions.TimeoutError,
    TimeoutError,
)
# The list API's Status text carries the health of a container with a healthcheck.
_HEALTH_IN_STATUS = re.compile(r"\((healthy|unhealthy|health: starting)\)")
# Seconds between two looks at ``stop`` while a watch is blocked reading the event stream.
_STOP_POLL = 0.2
# The names Docker gives containers.
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}")
# The largest process id Linux hands out (pid_max's ceiling).
_PID_MAX = 4_194_304


#: Signals after which a container is about to exit (``docker stop`` sends TERM, then KILL).
#: Other signals (HUP to reload, USR1, ...) leave it in service.
STOPPING_SIGNALS = frozenset({"2", "3", "9", "15", "SIGINT", "SIGQUIT", "SIGKILL", "SIGTERM"})
#: A container still running this long after a stop signal is routed again (it ignored it).
STOPPING_HOLD = 60.0
#: Containers inspected at once when many are new (an agent starting on a busy host).
INSPECT_WORKERS = 8


@dataclass(frozen=True)
class _Inspected:
    """What the snapshot needs of a container's inspect result. Image and environment cannot
    change while the id stays; the process id and address are those of the current start, so
    the entry is dropped when the container starts again, and whenever ``pid`` no longer names
    the process that had it when the container was inspected (``started``)."""

    image: str
    env: Mapping[str, str]
    pid: int = 0
    #: When ``pid`` started (``/proc/<pid>/stat``, clock ticks after boot), read right after
    #: the inspect; 0 when this agent cannot see the host's processes.
    started: int = 0
    address: str = ""
    stop_signal: int = 15  # the image's StopSignal: what `docker stop` sends first
    #: Why the container cannot be used ("" if it can): an inspect refused by the daemon, or
    #: a result that cannot be read. Such an entry is not cached.
    problem: str = ""


class _EventStream:
    """One open events stream and the client it belongs to; ``close`` works from any thread."""

    def __init__(self, client: docker.APIClient, stream: Any) -> None:
        self.client = client
        self.stream = stream
        self.closed = False
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.stream)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        # Shutting the socket down wakes the reader blocked in recv(); the SDK may trip over a
        # half-closed response while doing so, which must not stop the cleanup.
        with contextlib.suppress(Exception):
            self.stream.close()
        with contextlib.suppress(Exception):
            self.client.close()


class DockerSource(Source):
    """Containers of the Docker daemon named by ``ctx.config.host`` (see :class:`DockerConfig`)."""

    def __init__(self, ctx: PluginContext[DockerConfig]) -> None:
        self._host = ctx.config.host.strip()
        self._timeout = ctx.config.timeout
        self.url = self._host or os.environ.get("DOCKER_HOST", "").strip() or DEFAULT_URL
        self._host_ip = ctx.host.ip
        self._host_id = ctx.host.id
        self._policy = ExposurePolicy.from_config(ctx.core)
        if _is_loopback(self._host_ip) and not self._policy.single_machine:
            log.warning(
                "docker: HOST_IP %s is a loopback address: only this machine's proxy will "
                "route to these instances (other hosts refuse them); set the core option "
                "single_machine when every agent runs on this machine",
                self._host_ip,
            )
        self._lock = threading.Lock()  # guards _client and _streams
        self._snapshot_lock = threading.Lock()  # one snapshot at a time (it owns the cache)
        self._client: docker.APIClient | None = None
        self._streams: set[_EventStream] = set()
        self._cache: dict[str, _Inspected] = {}
        # Containers whose ``die``/``destroy`` event arrived. The daemon sends ``die`` before its
        # container list stops showing the container as running, so a snapshot taken at once
        # would still see it: these ids are left out until the list agrees or they start again.
        self._exited: set[str] = set()
        # Containers sent a stop signal (``docker stop`` emits ``kill`` before the process
        # exits): they leave the registry at once, so no new request reaches a container that
        # is shutting down, and come back only if they are still running after STOPPING_HOLD.
        self._stopping: dict[str, float] = {}
        self._targets: dict[str, CheckTarget] = {}  # instance id -> where its app listens
        self._instances_of: dict[str, tuple[str, ...]] = {}  # container id -> instance ids
        # How many ``start`` events each container had: an inspect taken before a restart
        # (old pid, maybe old address) must not be cached past it.
        self._starts: dict[str, int] = {}
        # Whether this agent sees the host's processes (a container's /proc/<pid> was read):
        # then a process missing right after its inspect has exited.
        self._sees_pids = False
        # Inspects begun by a ``start`` event, by container id with the start count they
        # belong to: the snapshot that event asks for lists the containers meanwhile, so a
        # new container costs one daemon round trip, not two in a row.
        self._early: dict[str, tuple[int, Future[_Inspected | None]]] = {}
        self._early_pool: ThreadPoolExecutor | None = None
        self._pids_warned = False

    # -- connection

    def _connect(self) -> docker.APIClient:
        """A new low-level client; the API version is negotiated with the daemon now."""
        try:
            kwargs: dict[str, Any] = docker.utils.kwargs_from_env()
            if self._host:
                kwargs["base_url"] = self._host
            return docker.APIClient(version="auto", timeout=self._timeout, **kwargs)
        except _DAEMON_ERRORS as exc:
            raise self._unavailable(exc) from None

    def _api(self) -> docker.APIClient:
        with self._lock:
            client = self._client
        if client is not None:
            return client
        client = self._connect()
        with self._lock:
            if self._client is None:
                self._client = client
                return client
            winner = self._client
        client.close()
        return winner

    def _forget(self, client: docker.APIClient) -> None:
        """Drop a client that failed: the next call connects (and negotiates) again."""
        with self._lock:
            if self._client is client:
                self._client = None
        with contextlib.suppress(Exception):
            client.close()

    def _unavailable(self, exc: BaseException) -> Unavailable:
        return Unavailable(f"Docker daemon at {self.url} unavailable: {self._reason(exc)}")

    def _reason(self, exc: BaseException) -> str:
        """A one-line reason from an SDK / requests / urllib3 exception chain."""
        chain = list(exception_chain(exc))
        for item in chain:
            if isinstance(item, docker.errors.APIError):
                status = item.status_code if item.status_code is not None else "?"
                return _one_line(f"API error {status}: {item.explanation or item}")
        # Before timeouts: urllib3's NewConnectionError is a kind of ConnectTimeoutError.
        for item in reversed(chain):
            if isinstance(item, OSError) and item.strerror:
                return _one_line(item.strerror)
        if any(isinstance(item, _TIMEOUTS) for item in chain):
            return f"no answer within {self._timeout:g}s"
        return _one_line(str(exc) or type(exc).__name__)

    # -- snapshot

    def snapshot(self) -> SourceSnapshot:
        with self._snapshot_lock:
            client = self._api()
            try:
                listed = client.containers(filters={"status": "running"})
                if not isinstance(listed, list):
                    raise Unavailable(
                        f"Docker daemon at {self.url} answered the container list with "
                        f"{type(listed).__name__}, not a list"
                    )
                return self._build(client, listed)
            except _DAEMON_ERRORS as exc:
                self._forget(client)
                raise self._unavailable(exc) from None

    def _build(self, client: docker.APIClient, listed: list[Any]) -> SourceSnapshot:
        instances: list[ServiceInstance] = []
        problems: list[Problem] = []
        seen: dict[str, _Inspected] = {}
        targets: dict[str, CheckTarget] = {}
        instances_of: dict[str, tuple[str, ...]] = {}
        with self._lock:
            exited = set(self._exited)
            starts = dict(self._starts)
        fresh = self._inspect_new(client, listed)
        for entry in listed:
            if not isinstance(entry, Mapping):
                continue
            cid = entry.get("Id")
            if not isinstance(cid, str) or not cid:
                continue
            try:
                inspected = self._cache.get(cid)
                if inspected is not None and not _same_process(inspected):
                    # Restarted (or stopped) since it was inspected, and the event that says
                    # so is not read yet (or was missed): its process id is another's now.
                    inspected = None
                inspected = inspected or fresh.get(cid)
                if inspected is None:
                    early, inspected = self._take_early(cid, starts.get(cid, 0))
                    if not early:
                        inspected = self._inspect(client, cid)
                    if inspected is None:
                        continue  # gone between the list and the inspect
                if inspected.problem:
                    problems.append(Problem(_subject(entry, cid), inspected.problem))
                    continue  # not cached: inspected again next time
                seen[cid] = inspected
                if not _eligible(entry):
                    continue
                spec = _spec(cid, entry, inspected)
                found, refused = instances_for(
                    spec, host_ip=self._host_ip, host_id=self._host_id, policy=self._policy
                )
                found = [_with_local_address(inspected, instance) for instance in found]
                container_targets: dict[str, CheckTarget] = {}
                for instance in found:
                    target = _check_target(inspected, instance)
                    if target is not None:
                        container_targets[instance.id] = target
            except _DAEMON_ERRORS:
                raise  # the daemon itself: the whole snapshot is unavailable
            except Exception as exc:  # one odd container never stops the host's snapshot
                problems.append(Problem(_subject(entry, cid), _unexpected(exc)))
                continue
            instances.extend(found)
            problems.extend(refused)
            instances_of[cid] = tuple(i.id for i in found)
            targets.update(container_targets)
        with self._lock:
            for cid, count in self._starts.items():
                if starts.get(cid, 0) != count:
                    # Restarted while this snapshot ran: inspect it again next time. Its target
                    # stays: a check that finds its process gone asks for that next snapshot,
                    # and never checks the published port instead.
                    seen.pop(cid, None)
            self._cache = seen
            self._targets = targets
            self._instances_of = instances_of
            for cid in [c for c, (_, f) in self._early.items() if f.done() and c not in seen]:
                del self._early[cid]  # gone before it was listed: nothing will take it
        with self._lock:  # a hint is needed only while the list still shows the container
            self._exited &= set(seen) | (self._exited - exited)
            for cid in set(self._stopping) - set(seen):
                del self._stopping[cid]  # gone from the list: the mark has done its job
        return SourceSnapshot(tuple(instances), tuple(problems))

    def lookup(self, ref: str) -> tuple[ContainerSpec, str] | None:
        """The container named ``ref`` (or whose id starts with it, 4 characters at least),
        running or not, and why it is not eligible."""
        text = ref.strip().removeprefix("/")
        if not text:
            return None
        client = self._api()
        try:
            listed = client.containers(all=True)
        except _DAEMON_ERRORS as exc:
            self._forget(client)
            raise self._unavailable(exc) from None
        for entry in listed if isinstance(listed, list) else ():
            if not isinstance(entry, Mapping) or not isinstance(entry.get("Id"), str):
                continue
            cid = entry["Id"]
            names = {n.removeprefix("/") for n in entry.get("Names") or () if isinstance(n, str)}
            if text in names or (len(text) >= 4 and cid.startswith(text)):
                inspected = self._inspect(client, cid)
                if inspected is None:
                    return None
                return _spec(cid, entry, inspected), _ineligible(entry)
        return None

    def stopping(self) -> frozenset[str]:
        """Instances of the last snapshot whose container was sent its stop signal (the
        ``kill`` event of ``docker stop``), or exited (``die``) while the list still shows it
        running. A container still running ``STOPPING_HOLD`` seconds after a stop signal
        ignored it: it is routed again."""
        now = time.monotonic()
        with self._lock:
            for held, since in list(self._stopping.items()):
                if now - since > STOPPING_HOLD:
                    log.warning(
                        "docker: container %s still runs %.0fs after a stop signal; "
                        "routing it again",
                        held[:12],
                        now - since,
                    )
                    del self._stopping[held]
            leaving = self._exited | set(self._stopping)
            return frozenset(iid for cid in leaving for iid in self._instances_of.get(cid, ()))

    def inspected(self) -> frozenset[str]:
        """Ids of the containers whose inspect result is kept (those of the last snapshot):
        what an idle source holds in memory, for tests and diagnostics."""
        with self._lock:
            return frozenset(self._cache)

    def check_target(self, instance: ServiceInstance) -> CheckTarget | None:
        """The container's own network namespace and address: a check there reaches the
        application, not docker-proxy (which accepts before the application listens)."""
        return self._targets.get(instance.id)

    def _inspect_new(self, client: docker.APIClient, listed: list[Any]) -> dict[str, _Inspected]:
        """Inspect the containers not seen before, several at a time (an agent starting on a
        host with hundreds of containers must not wait for hundreds of round trips in a row)."""
        new = [
            entry["Id"]
            for entry in listed
            if isinstance(entry, Mapping)
            and isinstance(entry.get("Id"), str)
            and entry["Id"]
            and entry["Id"] not in self._cache
        ]
        if len(new) < 4:
            return {}  # inspected one by one in the loop
        found: dict[str, _Inspected] = {}
        with ThreadPoolExecutor(INSPECT_WORKERS, thread_name_prefix="discoverd-inspect") as pool:
            inspections = pool.map(lambda c: self._inspect(client, c), new)
            for cid, inspected in zip(new, inspections, strict=True):
                if inspected is not None:
                    found[cid] = inspected
        return found

    def _inspect_early(self, cid: str, count: int) -> None:
        """Begin inspecting ``cid``, just started (its ``count``-th start), in the background."""
        with self._lock:
            client = self._client  # never connect here: this is the event stream's thread
            if client is None:
                return
            if self._early_pool is None:
                self._early_pool = ThreadPoolExecutor(2, thread_name_prefix="discoverd-inspect")
            pool = self._early_pool
            try:
                future = pool.submit(self._inspect, client, cid)
            except RuntimeError:  # closed meanwhile
                return
            self._early[cid] = (count, future)

    def _take_early(self, cid: str, count: int) -> tuple[bool, _Inspected | None]:
        """The background inspect of ``cid`` if one was begun for its ``count``-th start:
        ``(True, result)``, the result ``None`` when it was gone; ``(False, None)`` when there
        is none, it belongs to another start, or it failed (the caller inspects now)."""
        with self._lock:
            entry = self._early.pop(cid, None)
        if entry is None or entry[0] != count:
            return False, None
        try:
            return True, entry[1].result()
        except Exception:  # e.g. the daemon restarted: inspected again now
            return False, None

    def _inspect(self, client: docker.APIClient, cid: str) -> _Inspected | None:
        """The container's inspect result, ``None`` if it is gone, or one with a ``problem``
        if the daemon refused it or it cannot be read. Raises only when the daemon cannot be
        reached (the whole snapshot is then unavailable)."""
        try:
            data = client.inspect_container(cid)
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            return _Inspected(image="", env={}, problem=f"inspect refused: {self._reason(exc)}")
        except _DAEMON_ERRORS:
            raise  # the daemon cannot be reached: the whole snapshot is unavailable
        except Exception as exc:  # the SDK tripped over this container's answer
            return _Inspected(image="", env={}, problem=_unexpected(exc))
        try:
            inspected = _read_inspect(data)
        except Exception as exc:  # an odd answer refuses that container only
            return _Inspected(image="", env={}, problem=_unexpected(exc))
        if not inspected.pid:
            return inspected
        started = _process_start(inspected.pid)
        if started:
            self._sees_pids = True
            return dataclasses.replace(inspected, started=started)
        if self._sees_pids:
            return None  # its process exited since the inspect: the container is stopping
        if not self._pids_warned:
            self._pids_warned = True
            log.warning(
                "docker: container processes are not visible here (/proc/%d: no such process; "
                "an agent in a container needs --pid host): readiness checks use the published "
                "ports, and proxy modes are not detected",
                inspected.pid,
            )
        return inspected  # no namespace to enter: the published port is checked

    # -- watch

    def watch(self, notify: Notify, stop: threading.Event) -> None:
        if stop.is_set():
            return
        client = self._connect()
        try:
            raw = client.events(
                filters={"type": "container", "event": list(WATCHED_ACTIONS)}, decode=True
            )
        except _DAEMON_ERRORS as exc:
            with contextlib.suppress(Exception):
                client.close()
            raise self._unavailable(exc) from None
        stream = _EventStream(client, raw)
        with self._lock:
            self._streams.add(stream)
        finished = threading.Event()
        guard = threading.Thread(
            target=_close_on_stop,
            args=(stop, finished, stream),
            name="discoverd-docker-watch-stop",
            daemon=True,
        )
        guard.start()
        try:
            # Anything that happened before the stream opened was not seen as an event.
            notify("docker events connected")
            for event in stream:
                if stop.is_set():
                    return
                action = self.note_event(event)
                if action is not None:
                    notify(f"docker {action}")
            # The SDK ends the stream without an error when the daemon goes away.
            if not (stop.is_set() or stream.closed):
                log.debug("docker: event stream from %s ended", self.url)
        except Exception as exc:
            if stop.is_set() or stream.closed:
                return
            if isinstance(exc, _DAEMON_ERRORS):
                raise self._unavailable(exc) from None
            raise
        finally:
            finished.set()
            stream.close()
            with self._lock:
                self._streams.discard(stream)

    def note_event(self, event: Any) -> str | None:
        """Take in one event of the daemon's stream (the watch calls it for each): remember a
        container that exited or was sent its stop signal (see :meth:`stopping`), forget it
        when it starts again. Returns the event's action when it may change the snapshot
        (``"die"``, ``"health_status: healthy"``), else ``None``. Public so that an event can
        be replayed, e.g. by a test."""
        action = _watched_action(event)
        if action is not None:
            self._note_exit(event, action)
        return action

    def _note_exit(self, event: Any, action: str) -> None:
        if not isinstance(event, Mapping):
            return
        verb = action.split(":", 1)[0].strip()
        if verb not in ("die", "destroy", "start", "kill", "stop"):
            return
        actor = event.get("Actor")
        cid = event.get("id") or (actor.get("ID") if isinstance(actor, Mapping) else None)
        if not isinstance(cid, str) or not cid:
            return
        if verb == "kill":
            attributes = actor.get("Attributes") if isinstance(actor, Mapping) else None
            sent = attributes.get("signal") if isinstance(attributes, Mapping) else None
            known = self._cache.get(cid)
            own_stop = known is not None and _signal_number(sent) == known.stop_signal
            if str(sent).upper() not in STOPPING_SIGNALS and not own_stop:
                return  # e.g. HUP to reload its configuration: stays in service
        with self._lock:
            if verb == "start":
                self._exited.discard(cid)
                self._stopping.pop(cid, None)
                self._cache.pop(cid, None)  # a new process: new pid, maybe a new address
                count = self._starts[cid] = self._starts.get(cid, 0) + 1
            elif verb in ("kill", "stop"):
                self._stopping.setdefault(cid, time.monotonic())
            else:
                self._exited.add(cid)
                self._stopping.pop(cid, None)
                if verb == "destroy":
                    self._starts.pop(cid, None)
                    self._early.pop(cid, None)
        if verb == "start":
            self._inspect_early(cid, count)

    def close(self) -> None:
        with self._lock:
            streams = list(self._streams)
            client, self._client = self._client, None
            pool, self._early_pool = self._early_pool, None
            self._early.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for stream in streams:
            stream.close()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def _read_inspect(data: Any) -> _Inspected:
    """What the snapshot needs of an inspect result, whatever its shape: a value of the wrong
    type reads as absent."""
    if not isinstance(data, Mapping):
        data = {}
    config = data.get("Config")
    if not isinstance(config, Mapping):
        config = {}
    raw_env = config.get("Env")
    env_list = [e for e in raw_env if isinstance(e, str)] if isinstance(raw_env, list) else []
    state = data.get("State")
    pid = state.get("Pid") if isinstance(state, Mapping) else None
    if not (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= _PID_MAX):
        pid = 0
    return _Inspected(
        image=_text(config.get("Image")),
        env=parse_env(env_list),
        pid=pid,
        address=_container_address(data.get("NetworkSettings")),
        stop_signal=_signal_number(config.get("StopSignal")) or 15,
    )


def _close_on_stop(stop: threading.Event, finished: threading.Event, stream: _EventStream) -> None:
    """Close ``stream`` once ``stop`` is set, so a watch blocked in a read returns promptly."""
    while not finished.wait(_STOP_POLL):
        if stop.is_set():
            stream.close()
            return


def _watched_action(event: Any) -> str | None:
    """The action of a container event worth a snapshot (``"health_status: healthy"``), or None."""
    if not isinstance(event, Mapping):
        return None
    if event.get("Type", "container") != "container":
        return None
    action = event.get("Action") or event.get("status")
    if not isinstance(action, str):
        return None
    if action.split(":", 1)[0].strip() not in WATCHED_ACTIONS:
        return None
    return _one_line(action)[:80]


def _signal_number(value: Any) -> int | None:
    """``"15"``, ``15``, ``"SIGTERM"``, ``"TERM"``, ``"SIGRTMIN+3"`` -> a signal number from 1
    to 64, else None (whatever ``value`` is)."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip().upper()
    else:
        return None
    if len(text) > 16 or not text.isascii():
        return None
    if text.isdigit():
        number = int(text)
    else:
        name = text if text.startswith("SIG") else f"SIG{text}"
        base, plus, offset = name.partition("+")
        try:
            number = int(signal.Signals[base]) if base != "SIGRTMIN" else int(signal.SIGRTMIN)
        except KeyError:
            return None
        if plus:
            if not offset.isdigit():
                return None
            number += int(offset)
    return number if 1 <= number <= 64 else None


def _container_address(settings: Any) -> str:
    """The container's IP address on its first network ("" if it has none): an IP literal,
    never a name a check would resolve."""
    if not isinstance(settings, Mapping):
        return ""
    candidates = [settings.get("IPAddress")]
    networks = settings.get("Networks")
    if isinstance(networks, Mapping):
        for name in sorted(n for n in networks if isinstance(n, str)):
            network = networks[name]
            if isinstance(network, Mapping):
                candidates.append(network.get("IPAddress"))
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            try:
                return str(ipaddress.ip_address(candidate))
            except ValueError:
                continue
    return ""


def _with_local_address(inspected: _Inspected, instance: ServiceInstance) -> ServiceInstance:
    """``instance`` with its container address (metadata ``container_address``: the
    container's own IP and the private port), which the discover role of this host dials
    instead of the published port (no docker-proxy on the way). Only for a TCP port of a
    container with an address of its own (not one on the host's network, nor loopback)."""
    if instance.protocol != "tcp" or not inspected.address:
        return instance
    private = instance.id.rsplit(":", 2)[-2]
    if not private.isdigit():
        return instance
    try:
        return with_container_address(instance, inspected.address, int(private))
    except ValidationError:
        return instance


def _process_start(pid: int) -> int:
    """When process ``pid`` started (field 22 of ``/proc/<pid>/stat``, clock ticks after
    boot); 0 when there is no such process here."""
    try:  # os.read: half the cost of a file object, once per container and snapshot
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        return int(data.rsplit(b")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _same_process(inspected: _Inspected) -> bool:
    """True while ``inspected.pid`` still names the process it named at the inspect (not
    another one, after the container restarted or stopped and the id was handed out again)."""
    return not inspected.started or _process_start(inspected.pid) == inspected.started


def _check_target(inspected: _Inspected, instance: ServiceInstance) -> CheckTarget | None:
    """Dial the private port from inside the container's namespace, where no forwarder sits.
    ``None`` (the published port) when this agent cannot see the container's process."""
    if not inspected.pid or not inspected.started:
        return None
    private = instance.id.rsplit(":", 2)[-2]
    if not private.isdigit():
        return None
    return CheckTarget(
        address=inspected.address or "127.0.0.1",
        port=int(private),
        netns=f"/proc/{inspected.pid}/ns/net",
    )


def _spec(cid: str, entry: Mapping[str, Any], inspected: _Inspected) -> ContainerSpec:
    """What the metadata rules need of a container: its list entry and its inspect result."""
    return ContainerSpec(
        id=cid,
        name=_container_name(entry.get("Names")),
        image=inspected.image or _text(entry.get("Image")),
        labels=_string_map(entry.get("Labels")),
        env=inspected.env,
        ports=_bindings(entry.get("Ports")),
    )


def _ineligible(entry: Mapping[str, Any]) -> str:
    """Why a container is not eligible (``""`` when it is), for ``explain``."""
    if _eligible(entry):
        return ""
    state = _text(entry.get("State")) or "unknown"
    status = _one_line(_text(entry.get("Status")))
    if state != "running":
        return f"not running ({state}: {status})"
    return f"not healthy yet or unhealthy ({status})"


def _eligible(entry: Mapping[str, Any]) -> bool:
    """Running, and healthy if it has a healthcheck."""
    state = entry.get("State")
    if isinstance(state, str) and state and state != "running":
        return False
    health = entry.get("Health")  # structured health, in newer API versions
    if isinstance(health, Mapping):
        status = health.get("Status")
        if status in ("starting", "unhealthy"):
            return False
        if status == "healthy":
            return True
    match = _HEALTH_IN_STATUS.search(_text(entry.get("Status")))
    return match is None or match.group(1) == "healthy"


def _bindings(raw: Any) -> tuple[PortBinding, ...]:
    """Every published binding of the list API's ``Ports``, deduplicated.

    ``-p 8000`` publishes on ``0.0.0.0`` and ``::`` alike: when a private port has an IPv4
    binding, its IPv6 ones are dropped so one listener does not become two instances.
    """
    found: set[PortBinding] = set()
    for item in raw if isinstance(raw, list) else ():
        if not isinstance(item, Mapping):
            continue
        protocol = item.get("Type")
        private = _port_number(item.get("PrivatePort"))
        public = _port_number(item.get("PublicPort"))
        if protocol not in ("tcp", "udp") or private is None or public is None:
            continue  # exposed but not published, or not a protocol we register
        host_ip = _text(item.get("IP")).strip()
        found.add(PortBinding(private, "tcp" if protocol == "tcp" else "udp", host_ip, public))
    with_ipv4 = {(b.private_port, b.protocol) for b in found if ":" not in b.host_ip}
    kept = [
        b for b in found if ":" not in b.host_ip or (b.private_port, b.protocol) not in with_ipv4
    ]
    return tuple(sorted(kept, key=lambda b: (b.private_port, b.protocol, b.host_ip, b.host_port)))


def _port_number(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 5):  # "²".isdigit() is true
            return None
        value = int(text)
    if isinstance(value, int) and 1 <= value <= 65535:
        return value
    return None


def _container_name(names: Any) -> str:
    """The container's own name: the entry of ``Names`` that is not a link alias (``/a/b``).
    Names Docker would not give (its rule: ``[a-zA-Z0-9][a-zA-Z0-9_.-]+``) are not used: the
    problems then name the container by its id."""
    candidates = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    for name in candidates:
        bare = name.removeprefix("/")
        if _CONTAINER_NAME.fullmatch(bare):
            return bare
    return ""


def _string_map(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _subject(entry: Mapping[str, Any], cid: str) -> str:
    """How a problem names a container of the list: ``container web (4aa832c39b65)``."""
    return f"container {_container_name(entry.get('Names')) or cid[:12]} ({cid[:12]})"


def _unexpected(exc: BaseException) -> str:
    """A problem for an error no rule foresaw, naming the exception's type and where it was
    raised, never its message (which may quote a hostile value)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" in {frames[-1].name}, line {frames[-1].lineno}" if frames else ""
    return f"skipped: unexpected {type(exc).__name__} reading it{where}"


def _is_loopback(address: str) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped.is_loopback
    return parsed.is_loopback


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:297] + "..."
