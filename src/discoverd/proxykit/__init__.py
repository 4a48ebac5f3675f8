"""discoverd.proxykit: what proxy plugins share, public for third-party plugins too.

The built-in HAProxy and nginx plugins and the example ``json-file`` plugin are written with it:

- :class:`ManagedProxy`: the apply skeleton (lock, compare with the configuration confirmed
  running, atomic write, start or reload, roll back on refusal, confirm) and the status of the
  last apply;
- files: :func:`write_atomic` (durable), :func:`read_bytes`, :func:`read_text`,
  :func:`ensure_directory`, :func:`check_state_dir`;
- processes: :func:`find_executable`, :func:`run_check_command`, :func:`directory_lock`, and
  the supervision of a proxy that outlives discoverd: :func:`start_detached`, :class:`PidFile`
  (adoption with an identity check a local user cannot fake: real uid and executable),
  :func:`stop_process`, :func:`pid_alive`, :func:`wait_gone`, :func:`command_line`,
  :func:`process_title`, :func:`real_uid`, :func:`executable_of`, :func:`child_pids`,
  :func:`writes_to`;
- ports: :func:`held_ports` (which frontend ports another process holds, and which process:
  what ``Proxy.unservable`` reports), :class:`HeldPort`; :class:`OwnPage` (a stats page left
  out of the configuration while another process holds its port);
- logs: :class:`LogFile` (read by offset, trimmed), :func:`last_lines`, :func:`summarise`;
- templates: :func:`template_environment`, :func:`plugin_environment`, :func:`load_template`
  (user templates first, ``default:`` for the shipped ones).

See docs/proxykit.md. Importing this package imports jinja2: import it in your factory, not in
the module your entry point names.
"""

from discoverd.proxykit.files import (
    check_state_dir,
    ensure_directory,
    read_bytes,
    read_text,
    write_atomic,
)
from discoverd.proxykit.logs import LogFile, last_lines, summarise
from discoverd.proxykit.managed import (
    APPLIED_MARKER,
    ApplyStatus,
    ManagedProxy,
    ProxyRefused,
    ReloadAttempt,
)
from discoverd.proxykit.ports import HeldPort, OwnPage, held_ports
from discoverd.proxykit.process import (
    SBIN_DIRS,
    directory_lock,
    find_executable,
    pid_alive,
    run_check_command,
)
from discoverd.proxykit.supervise import (
    PidFile,
    child_pids,
    command_line,
    executable_of,
    process_title,
    read_pid,
    real_uid,
    start_detached,
    stop_process,
    wait_gone,
    writes_to,
)
from discoverd.proxykit.templates import load_template, plugin_environment, template_environment

__all__ = [
    "APPLIED_MARKER",
    "SBIN_DIRS",
    "ApplyStatus",
    "HeldPort",
    "LogFile",
    "ManagedProxy",
    "OwnPage",
    "PidFile",
    "ProxyRefused",
    "ReloadAttempt",
    "check_state_dir",
    "child_pids",
    "command_line",
    "directory_lock",
    "ensure_directory",
    "executable_of",
    "find_executable",
    "held_ports",
    "last_lines",
    "load_template",
    "pid_alive",
    "plugin_environment",
    "process_title",
    "read_bytes",
    "read_pid",
    "read_text",
    "real_uid",
    "run_check_command",
    "start_detached",
    "stop_process",
    "summarise",
    "template_environment",
    "wait_gone",
    "write_atomic",
    "writes_to",
]
