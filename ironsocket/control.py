"""The running server's control socket: a unix stream socket speaking JSON lines.

Protocol: a client connects, sends one JSON object per line ``{"command": "...", ...}`` and reads
one JSON line back per request: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
Unknown commands and malformed JSON get a clean error answer; every read has a timeout.

Where: ``<control_dir>/ironsocket-<pid>.sock`` (mode 0600; the directory is ours and private, see
`control_dir`). Binding removes an old file at the path only if it is a socket nobody listens on.
Clients find servers with `find_servers` and pick one with `resolve`. A ``serve --workers N``
supervisor has one too (`workers`): ``upgrade`` there is a rolling upgrade of its workers, and
``inspect-keys``/``connections`` gather theirs; each worker keeps its own socket as well.

Handlers are ``handlers[command](request) -> dict``. A handler that must keep the connection
(the exec upgrade answers later, from the new program) is wrapped in `Takeover`: it is called as
``handler(request, conn)`` with a `ControlConnection`, and from then on owns it (reply with
``conn.send(obj)``, end with ``conn.close()``). `ControlServer.from_fd` adopts an
already-listening socket (inherited across exec); `fileno()` gives it out.

Progress: a request with ``"progress": true`` may get lines ``{"phase": "...", ...}`` (no
``"ok"``) before its answer, as the work goes on; ``upgrade`` sends ``check``, ``quiesce`` and
``exec`` (the answer, from the new program, says how many connections it restored). A client
that did not ask gets only the answer.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("ironsocket.control")

READ_TIMEOUT = 10.0  # seconds a client may take to send a request line
MAX_LINE = 1 << 20
SOCKET_PREFIX = "ironsocket-"
SOCKET_SUFFIX = ".sock"


class ControlError(Exception):
    """A control-socket operation failed; the message is for a human."""


# -- where --------------------------------------------------------------------------------------
def control_dir(create: bool = True) -> Path:
    """``$IRONSOCKET_RUN_DIR``, else ``/run/ironsocket`` if we can write there (root), else
    ``$XDG_RUNTIME_DIR/ironsocket``, else ``/tmp/ironsocket-<uid>``.

    Only a directory we create is given mode 0700; an existing one is never chmod'ed
    (``IRONSOCKET_RUN_DIR=/tmp`` must not make /tmp private). An existing directory is used as
    it is if it is safe: not a symlink, owned by us, not writable by group/others. A shared
    sticky directory like /tmp (world-writable, sticky, owned by root or us) is not used
    directly: our sockets go into a private subdirectory ``ironsocket-<uid>`` of it (created 0700,
    or, if it exists, held to the same rule). Anything else is a ControlError naming the path.
    With ``create=False`` nothing is created or checked (clients looking for servers)."""
    env = os.environ.get("IRONSOCKET_RUN_DIR")
    if env:
        path = Path(env)
    elif os.access("/run", os.W_OK) or os.access("/run/ironsocket", os.W_OK):
        path = Path("/run/ironsocket")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "ironsocket"
    else:
        path = Path(f"/tmp/ironsocket-{os.getuid()}")
    if not create:
        return _private_subdir(path) if _is_shared_sticky(path) else path
    if _ensure_dir(path) == "shared":
        path = _private_subdir(path)
        if _ensure_dir(path) == "shared":
            raise ControlError(f"control directory {path} is writable by group/others")
    return path


def _private_subdir(path: Path) -> Path:
    return path / f"ironsocket-{os.getuid()}"  # as the /tmp fallback: IRONSOCKET_RUN_DIR=/tmp gives the same


def _is_shared_sticky(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_ISVTX) and bool(st.st_mode & 0o002)
            and st.st_uid in (0, os.geteuid()))


def _ensure_dir(path: Path) -> str:
    """Create ``path`` 0700 ("created"), or check an existing one: "ok" (ours, private enough),
    "shared" (a sticky world-writable directory); ControlError otherwise."""
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlError(f"cannot create control directory {path.parent}: {exc.strerror}") from None
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(f"cannot create control directory {path}: {exc.strerror}") from None
    else:
        os.chmod(path, 0o700)  # we created it: exactly 0700 whatever the umask
        return "created"
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise ControlError(f"control directory {path} is a symbolic link; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"control directory {path} is not a directory")
    if _is_shared_sticky(path):
        return "shared"
    if st.st_uid != os.geteuid():
        raise ControlError(f"control directory {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise ControlError(f"control directory {path} is writable by group/others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}); fix its mode or set IRONSOCKET_RUN_DIR elsewhere")
    return "ok"


def default_socket_path(pid: int | None = None) -> Path:
    return control_dir() / f"{SOCKET_PREFIX}{pid or os.getpid()}{SOCKET_SUFFIX}"


# -- server -------------------------------------------------------------------------------------
class ControlConnection:
    """One accepted client. `send` writes one JSON line; `recv` reads one (or None at EOF)."""

    def __init__(self, sock: socket.socket, timeout: float = READ_TIMEOUT) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self._buf = bytearray()
        self.closed = False
        self.wants_progress = False  # the request said "progress": true (see the module doc)

    def peer_uid(self) -> int | None:
        try:
            creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            return int.from_bytes(creds[4:8], "little")
        except OSError:
            return None

    def recv(self) -> bytes | None:
        """The next line (without newline); None at EOF. Raises TimeoutError, ControlError."""
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise ControlError(f"request line longer than {MAX_LINE} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                if self._buf:
                    line, self._buf = bytes(self._buf), bytearray()
                    return line
                return None
            self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


@dataclass(frozen=True)
class Takeover:
    """Marks a handler ``fn(request, conn) -> None`` that takes over the connection."""

    fn: Callable[[dict[str, Any], ControlConnection], None]


Handler = Callable[[dict[str, Any]], dict[str, Any]] | Takeover


class ControlServer:
    """A unix stream socket (0600) served by one daemon accept thread (one short-lived thread
    per client connection). ``handlers``: command name → handler; ``ping`` is built in."""

    def __init__(self, path: Path | str | None, handlers: dict[str, Handler], *, version: str | None = None,
                 read_timeout: float = READ_TIMEOUT, about: Callable[[], dict[str, Any]] | None = None,
                 _sock: socket.socket | None = None) -> None:
        self.handlers: dict[str, Handler] = {"ping": self._ping, **handlers}
        self.about = about  # more for ``ping``: a --workers supervisor's workers, a worker's supervisor
        self.read_timeout = read_timeout
        self.version = version or _version()
        if _sock is not None:
            self._sock = _sock
            name = _sock.getsockname()
            self.path = Path(name) if isinstance(name, str) and name else None
        else:
            self.path = Path(path) if path is not None else default_socket_path()
            self._sock = self._bind(self.path)
        self._sock.setblocking(False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="is-control", daemon=True)
        self._thread.start()
        log.debug("control socket on %s", self.path)

    @classmethod
    def from_fd(cls, fd: int, handlers: dict[str, Handler], *, version: str | None = None,
                read_timeout: float = READ_TIMEOUT, about: Callable[[], dict[str, Any]] | None = None) -> ControlServer:
        """Adopt an already-listening unix socket (e.g. inherited across exec)."""
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise ControlError(f"fd {fd} is not a unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ControlError(f"fd {fd} is not listening")
        return cls(None, handlers, version=version, read_timeout=read_timeout, about=about, _sock=sock)

    @staticmethod
    def _bind(path: Path) -> socket.socket:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        remove_if_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot bind control socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        return sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def _ping(self, request: dict[str, Any]) -> dict[str, Any]:
        about = self.about() if self.about is not None else {}
        return {"pid": os.getpid(), "version": self.version, "path": str(self.path) if self.path else None, **about}

    # -- serving ---------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        import select

        poller = select.poll()  # not select(): after an upgrade our fd may be above 1024
        poller.register(self._sock.fileno(), select.POLLIN)
        while not self._stop.is_set():
            try:
                ready = poller.poll(200)
            except (OSError, ValueError):
                return  # closed under us
            if any(mask & (select.POLLNVAL | select.POLLERR) for _, mask in ready):
                return  # closed under us
            if not ready:
                continue
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.warning("control accept failed: %s", exc)
                continue
            conn.setblocking(True)
            threading.Thread(target=self._serve, args=(ControlConnection(conn, self.read_timeout),), name="is-control-conn",
                             daemon=True).start()

    def _serve(self, conn: ControlConnection) -> None:
        try:
            while not self._stop.is_set():
                try:
                    line = conn.recv()
                except TimeoutError:
                    conn.send({"ok": False, "error": f"no complete request within {self.read_timeout:g}s"})
                    return
                except ControlError as exc:
                    conn.send({"ok": False, "error": str(exc)})
                    return
                if line is None:
                    return
                if not line.strip():
                    continue
                if self._dispatch(line, conn) == "taken":
                    return
        except OSError:
            pass  # the client went away
        finally:
            if not getattr(conn, "_taken", False):
                conn.close()

    def _dispatch(self, line: bytes, conn: ControlConnection) -> str:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            conn.send({"ok": False, "error": f"malformed JSON: {exc}"})
            return "answered"
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            conn.send({"ok": False, "error": 'a request is a JSON object with a string "command"'})
            return "answered"
        command = request["command"]
        handler = self.handlers.get(command)
        if handler is None:
            conn.send({"ok": False, "error": f"unknown command {command!r}; known: {', '.join(sorted(self.handlers))}"})
            return "answered"
        log.debug("control command %s", command)
        request["_peer_uid"] = conn.peer_uid()
        conn.wants_progress = request.get("progress") is True
        try:
            if isinstance(handler, Takeover):
                conn._taken = True  # type: ignore[attr-defined]
                conn.sock.settimeout(None)
                handler.fn(request, conn)
                return "taken"
            answer = handler(request)
        except ControlError as exc:
            conn.send({"ok": False, "error": str(exc)})
            return "answered"
        except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the control socket
            log.exception("control command %s failed", command)
            conn.send({"ok": False, "error": f"internal error: {exc.__class__.__name__}"})
            return "answered"
        conn.send({"ok": True, **(answer or {})})
        return "answered"

    def close(self, *, unlink: bool = True) -> None:
        """Stop accepting; unlink the path (unless ``unlink=False``: another program keeps it)."""
        self._stop.set()
        self._thread.join(2)
        try:
            self._sock.close()
        except OSError:
            pass
        if unlink and self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # after `serve --user`: the run directory is root's
                log.info("control socket %s left in place: %s", self.path, exc.strerror)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- client -------------------------------------------------------------------------------------
def request(path: Path | str, obj: dict[str, Any], timeout: float = 10.0,
            on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Send one request, return the answer. Raises ControlError (with a human message).
    ``on_progress``: ask for progress lines (``"progress": true``) and get each one as it comes;
    ``timeout`` is then the time for the whole exchange."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}") from None
        except ConnectionRefusedError:
            raise ControlError(f"nothing listening on {path} (stale socket: the server is gone)") from None
        except PermissionError:
            raise ControlError(f"permission denied connecting to {path} (run as the server's user or root)") from None
        conn = ControlConnection(sock, timeout)
        deadline = time.monotonic() + timeout
        try:
            conn.send({**obj, "progress": True} if on_progress is not None else obj)
            while True:
                line = conn.recv()
                if line is None:
                    raise ControlError(f"{path}: the server closed the connection without answering")
                try:
                    answer = json.loads(line)
                except ValueError:
                    raise ControlError(f"{path}: malformed answer") from None
                if not isinstance(answer, dict):
                    raise ControlError(f"{path}: malformed answer")
                if on_progress is None or "phase" not in answer or "ok" in answer:
                    return answer
                on_progress(answer)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
        except TimeoutError:
            raise ControlError(f"{path}: no answer within {timeout:g}s") from None
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()


def _answers(path: Path, timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        answer = request(path, {"command": "ping"}, timeout=timeout)
    except ControlError:
        return None
    return answer if answer.get("ok") else None


def find_servers(directory: Path | None = None, timeout: float = 2.0) -> list[Path]:
    """Control sockets in ``directory`` (default `control_dir`) that answer ``ping``; sockets
    nothing listens on any more are removed."""
    directory = directory or control_dir()
    found = []
    try:
        candidates = sorted(directory.glob(f"*{SOCKET_SUFFIX}"))  # any name: --control-socket may pick one
    except OSError:
        return []
    for path in candidates:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except ConnectionRefusedError:
            _remove_stale(path)
            continue
        except OSError:
            continue
        finally:
            sock.close()
        if _answers(path, timeout) is not None:
            found.append(path)
    return found


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISREG, "regular file"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "file"


def remove_if_stale(path: Path, what: str = "control socket") -> None:
    """Before binding ``path``: remove it only if it is a socket nobody listens on (left by a
    process that died). Anything else there — another kind of file, a socket a server (ours or
    another program) answers on, one we cannot probe — is a ControlError naming the path."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{what} path {path} is a {_kind(st.st_mode)}, not a socket; "
                           "refusing to remove it (pick another path or remove it yourself)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        pass  # nobody listens: stale
    except OSError as exc:
        raise ControlError(f"{what} {path} exists and cannot be probed ({exc.strerror or exc}); "
                           "refusing to remove it") from None
    else:
        probe.close()
        if _answers(path):
            raise ControlError(f"{what} {path} is in use by a running server")
        raise ControlError(f"{what} path {path} is a socket another program listens on; refusing to remove it")
    finally:
        probe.close()
    path.unlink()
    log.debug("removed stale %s %s", what, path)


def _remove_stale(path: Path) -> None:
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
            log.debug("removed stale control socket %s", path)
    except OSError:
        pass


def _pid_of(path: Path) -> int | None:
    name = path.name
    if name.startswith(SOCKET_PREFIX) and name.endswith(SOCKET_SUFFIX):
        try:
            return int(name[len(SOCKET_PREFIX) : -len(SOCKET_SUFFIX)])
        except ValueError:
            return None
    return None


def resolve(pid: int | None = None, socket_path: Path | None = None) -> Path:
    """The control socket to talk to: ``socket_path`` if given; the server with ``pid``; else
    the single running server (an error if there are none or several; a ``--workers``
    supervisor's workers, whose ``ping`` names it as their ``supervisor``, count as the
    supervisor: its control socket upgrades and inspects them all)."""
    if socket_path is not None:
        return Path(socket_path)
    directory = control_dir()
    servers = find_servers(directory)
    if pid is not None:
        for path in servers:
            if _pid_of(path) == pid:
                return path
        for path in servers:  # a custom name inside the directory: ask it
            answer = _answers(path)
            if answer and answer.get("pid") == pid:
                return path
        raise ControlError(f"no ironsocket control socket for pid {pid} in {directory} "
                           "(started with another --control-socket? pass --socket PATH)")
    if len(servers) > 1:  # a --workers supervisor stands for its workers
        pings = {p: _answers(p) or {} for p in servers}
        pids = {answer.get("pid") for answer in pings.values()} - {None}
        servers = [p for p in servers if pings[p].get("supervisor") not in pids]
    if not servers:
        raise ControlError(f"no running ironsocket server found (no control socket answers in {directory}; "
                           "set IRONSOCKET_RUN_DIR or pass --socket PATH)")
    if len(servers) > 1:
        listing = "\n".join(f"  pid {_server_pid(p)}: {p}" for p in servers)
        raise ControlError(f"{len(servers)} ironsocket servers are running; choose one with --pid or --socket:\n{listing}")
    return servers[0]


def _server_pid(path: Path) -> str:
    pid = _pid_of(path)
    if pid is None:
        answer = _answers(path)
        pid = answer.get("pid") if answer else None
    return str(pid) if pid is not None else "?"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ironsocket")
    except Exception:  # noqa: BLE001
        return "unknown"


__all__ = [
    "ControlConnection", "ControlError", "ControlServer", "Handler", "Takeover",
    "control_dir", "default_socket_path", "find_servers", "request", "resolve",
]  # fmt: skip

