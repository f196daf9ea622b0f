"""TOML configuration: several listeners, SNI routes, admin endpoint (docs/config.md).

`load_file(path)` parses and validates a file into a `FileConfig` (global settings plus one
`server.ProxyConfig` per listener); `load(path)` returns just the listeners. Every problem is a
`ConfigError` naming the file, the key as a dotted path (``listeners[1].backend``) and its line:
tomllib reports syntax errors with a line; for everything else the line comes from `KeyLines`, a
small scanner of the TOML text that records where each key (and table header) was written.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backend import BackendSpec, Routes
from .logs import LogFormat, parse_format
from .secretfile import key_file_warning
from .server import KtlsMode, ProxyConfig, parse_hostport
from .tls13.constants import CipherSuite, Group
from .tls13.credentials import CertificateStore, Credential, CredentialError, load_credential
from .tls13.server import DEFAULT_CIPHER_SUITES, DEFAULT_GROUPS, ServerConfig
from .tls13.tickets import TicketConfig

Path_ = tuple[str | int, ...]

SUITE_NAMES = {s.name: s for s in CipherSuite} | {s.name.removeprefix("TLS_"): s for s in CipherSuite}
GROUP_NAMES = {"x25519": Group.X25519, "p256": Group.SECP256R1, "secp256r1": Group.SECP256R1,
               "p384": Group.SECP384R1, "secp384r1": Group.SECP384R1}
LOG_LEVELS = ("debug", "info", "warning", "error")

# The schema: allowed keys per table (unknown keys are errors, with a "did you mean").
TOP_KEYS = {"log_level", "log_format", "pid_file", "admin", "listeners"}
ADMIN_KEYS = {"listen", "unix", "allow_remote"}
LISTENER_KEYS = {"name", "listen", "backend", "certs", "routes", "alpn", "ciphers", "groups", "proxy_protocol",
                 "transparent", "ktls", "handshake_timeout", "idle_timeout", "connect_timeout", "max_connections",
                 "backlog", "tickets", "ticket_key_file", "ticket_lifetime",
                 "ticket_psk_ke"}
CERT_KEYS = {"cert", "key"}
ROUTE_KEYS = {"backend", "cert", "key", "proxy_protocol", "transparent", "connect_timeout"}


# -- errors and line numbers -----------------------------------------------------------------------
def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else '"' + part.replace('"', '\\"') + '"'
            out += ("." if out else "") + text
    return out


class ConfigError(Exception):
    """A configuration problem: ``file:line: key: what is wrong``."""

    def __init__(self, file: str | Path, message: str, *, key: str | None = None, line: int | None = None) -> None:
        self.file, self.key, self.line, self.reason = str(file), key, line, message
        where = self.file + (f":{line}" if line else "")
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


_BARE = r"[A-Za-z0-9_-]+"
_KEYPART = rf'(?:{_BARE}|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_KEYPART}(?:\s*\.\s*{_KEYPART})*"
_HEADER_RE = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_KEYVAL_RE = re.compile(rf"^\s*({_DOTTED})\s*=")


def _split_key(text: str) -> list[str]:
    parts = re.findall(_KEYPART, text)
    out = []
    for p in parts:
        if p.startswith('"'):
            out.append(bytes(p[1:-1], "utf-8").decode("unicode_escape"))
        elif p.startswith("'"):
            out.append(p[1:-1])
        else:
            out.append(p)
    return out


class KeyLines:
    """Where each key was written: dotted path (with array-of-tables indexes) → line number."""

    def __init__(self, text: str) -> None:
        self.lines: dict[Path_, int] = {}
        aot_count: dict[Path_, int] = {}
        current: Path_ = ()
        depth = 0  # open [ / { of a multi-line value
        in_ml: str | None = None  # inside a multi-line string
        for number, line in enumerate(text.splitlines(), start=1):
            if in_ml:
                if line.count(in_ml) % 2 == 1:
                    in_ml = None
                continue
            if depth > 0:
                depth += _bracket_balance(line)
                continue
            if m := _HEADER_RE.match(line):
                keys = _split_key(m.group(2))
                resolved = self._resolve(keys, aot_count)
                if m.group(1) == "[[":
                    index = aot_count.get(resolved, 0)
                    aot_count[resolved] = index + 1
                    current = resolved + (index,)
                else:
                    current = resolved
                self.lines.setdefault(current, number)
                continue
            if m := _KEYVAL_RE.match(line):
                path = current + tuple(_split_key(m.group(1)))
                self.lines.setdefault(path, number)
                rest = line[m.end():]
                for q in ('"""', "'''"):
                    if rest.count(q) % 2 == 1:
                        in_ml = q
                if not in_ml:
                    depth = max(0, _bracket_balance(rest))

    @staticmethod
    def _resolve(keys: list[str], aot_count: dict[Path_, int]) -> Path_:
        out: Path_ = ()
        for i, k in enumerate(keys):
            out = out + (k,)
            if i < len(keys) - 1 and out in aot_count:
                out = out + (aot_count[out] - 1,)
        return out

    def find(self, path: Path_) -> int | None:
        """The line of ``path``, else of its nearest ancestor that was written."""
        for n in range(len(path), 0, -1):
            if (line := self.lines.get(tuple(path[:n]))) is not None:
                return line
        return None


def _bracket_balance(text: str) -> int:
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', "", text).split("#", 1)[0]
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")


# -- result types --------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    listen: tuple[str, int] | None = None
    unix: str | None = None
    allow_remote: bool = False


@dataclass(frozen=True, kw_only=True)
class FileConfig:
    path: Path
    listeners: list[ProxyConfig]
    log_level: str = "info"
    log_format: LogFormat = LogFormat.TEXT  # text, logfmt or json (ironsocket.logs)
    pid_file: Path | None = None  # relative to the file's directory (ironsocket.pidfile; --pid-file wins)
    files: list[Path] = field(default_factory=list)  # every file it names that is read (a reload reads them again)
    ticket_key_files: list[Path] = field(default_factory=list)  # the same, for secrets (ironsocket.secretfile)
    admin: AdminConfig | None = None
    # For `ironsocket check`: per listener, the credentials loaded and the routes as written.
    details: list[dict[str, Any]] = field(default_factory=list)
    # Problems that do not stop it (a private key file others can read, a certificate that
    # expires soon); shown at start-up and by `check`.
    warnings: list[str] = field(default_factory=list)


# -- the loader ------------------------------------------------------------------------------------
class _Loader:
    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text
        self.lines = KeyLines(text)
        self.base = path.parent
        self.warnings: list[str] = []
        self.files: list[Path] = []
        self.ticket_key_files: list[Path] = []

    def error(self, path: Path_, message: str) -> ConfigError:
        return ConfigError(self.path, message, key=format_path(path) or None, line=self.lines.find(path))

    def check_keys(self, table: dict, allowed: set[str], path: Path_) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(allowed))}"
                raise self.error(path + (key,), f"unknown key{hint}")

    def get(self, table: dict, key: str, kind: type | tuple[type, ...], path: Path_, default: Any = None) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = " or ".join(_type_name(k) for k in kinds)
            raise self.error(path + (key,), f"must be {names}, not {_type_name(type(value))} {value!r}")
        return value

    def require(self, table: dict, key: str, kind, path: Path_) -> Any:
        if key not in table:
            raise self.error(path + (key,), "is required")
        return self.get(table, key, kind, path)

    def address(self, table: dict, key: str, path: Path_, *, listen: bool) -> tuple[str, int] | None:
        text = self.get(table, key, str, path)
        if text is None:
            return None
        try:
            host, port = parse_hostport(text)
        except ValueError as exc:
            raise self.error(path + (key,), str(exc)) from None
        if ":" not in text.strip("[]") and not text.startswith("["):
            # "PORT" alone is allowed; "host" alone (no port) is not.
            if not text.isdigit():
                raise self.error(path + (key,), f"{text!r}: expected HOST:PORT")
        if listen or _looks_like_ip(host):
            try:
                ipaddress.ip_address(host)
            except ValueError:
                if not (listen and host == "localhost"):
                    raise self.error(path + (key,), f"{text!r}: {host!r} is not an IP address") from None
        elif not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?", host):
            raise self.error(path + (key,), f"{text!r}: {host!r} is not a valid host name")
        if not listen and port == 0:
            raise self.error(path + (key,), f"{text!r}: port 0 is not a backend port")
        return host, port

    def file_path(self, table: dict, key: str, path: Path_) -> Path:
        value = self.require(table, key, str, path)
        p = Path(value).expanduser()
        p = p if p.is_absolute() else self.base / p
        try:
            with open(p, "rb"):
                pass
        except OSError as exc:
            raise self.error(path + (key,), f"cannot read {p}: {exc.strerror}") from None
        self.files.append(p)
        return p

    def credential(self, table: dict, path: Path_) -> Credential:
        cert, key = self.file_path(table, "cert", path), self.file_path(table, "key", path)
        if (warning := key_file_warning(key)) is not None:
            where = f"{self.path}:{line}" if (line := self.lines.find(path + ("key",))) else str(self.path)
            self.warnings.append(f"{where}: {format_path(path + ('key',))}: {warning}")
        try:
            return load_credential(cert, key)
        except CredentialError as exc:
            raise self.error(path + ("key",), str(exc)) from None

    def names(self, table: dict, key: str, path: Path_, lookup: dict | None) -> tuple:
        value = self.get(table, key, (list, str), path)
        if value is None:
            return ()
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item:
                raise self.error(path + (key, i), f"must be a non-empty string, not {item!r}")
            if lookup is None:
                out.append(item)
                continue
            found = lookup.get(item) or lookup.get(item.upper()) or lookup.get(item.lower())
            if found is None:
                close = difflib.get_close_matches(item, sorted(lookup), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; choose from {', '.join(sorted(lookup))}"
                raise self.error(path + (key,), f"unknown value {item!r}{hint}")
            out.append(found)
        return tuple(out)

    def alpn(self, table: dict, path: Path_) -> tuple:
        value = table.get("alpn")
        if isinstance(value, str):
            items = ", ".join(f'"{v.strip()}"' for v in value.split(",") if v.strip())
            raise self.error(path + ("alpn",), f"must be a list of protocols, not the string {value!r}: "
                                               f"write alpn = [{items}]")
        return self.names(table, "alpn", path, None)

    def proxy_protocol(self, table: dict, path: Path_, default: str | None = None) -> str | None:
        value = self.get(table, "proxy_protocol", (str, bool), path, default)
        if value is False or value in ("none", "off"):
            return None
        if value not in (None, "v1", "v2"):
            raise self.error(path + ("proxy_protocol",), f"must be \"v1\", \"v2\" or false, not {value!r}")
        return value

    def number(self, table: dict, key: str, path: Path_, default: float, *, positive: bool = True,
               integer: bool = False) -> Any:
        value = self.get(table, key, int if integer else (int, float), path, default)
        if value is not None and (value < 0 or (positive and value == 0 and integer)):
            raise self.error(path + (key,), f"must be {'> 0' if integer else '>= 0'}, not {value!r}")
        return value

    def tickets(self, table: dict, path: Path_) -> TicketConfig | None:
        """``tickets = N`` (default 2, 0: off), ``ticket_key_file``, ``ticket_lifetime``,
        ``ticket_psk_ke`` (tls13/tickets.py)."""
        from .ticketkeys import TicketKeyFileError, keyring
        from .tls13.tickets import DEFAULT_LIFETIME, MAX_LIFETIME, PskKeyExchangeMode

        count = self.number(table, "tickets", path, 2, positive=False, integer=True)
        if count > 16:
            raise self.error(path + ("tickets",), f"must be 0..16, not {count}")
        lifetime = self.number(table, "ticket_lifetime", path, DEFAULT_LIFETIME, integer=True)
        if lifetime > MAX_LIFETIME:
            raise self.error(path + ("ticket_lifetime",), f"must be at most {MAX_LIFETIME} seconds (RFC 8446 §4.6.1)")
        key_file = None
        if "ticket_key_file" in table:
            value = Path(self.get(table, "ticket_key_file", str, path)).expanduser()
            key_file = value if value.is_absolute() else self.base / value
            self.ticket_key_files.append(key_file)
        modes = {PskKeyExchangeMode.PSK_DHE_KE}
        if self.get(table, "ticket_psk_ke", bool, path, False):
            modes.add(PskKeyExchangeMode.PSK_KE)
        if count == 0 and key_file is None:
            return None
        try:
            return TicketConfig(keyring=keyring(key_file, lifetime), count=count, psk_modes=frozenset(modes))
        except TicketKeyFileError as exc:
            raise self.error(path + ("ticket_key_file",), str(exc)) from None

    # -- sections --
    def load(self, doc: dict) -> FileConfig:
        self.check_keys(doc, TOP_KEYS, ())
        log_level = self.get(doc, "log_level", str, (), "info")
        if log_level.lower() not in LOG_LEVELS:
            raise self.error(("log_level",), f"must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
        log_format_text = self.get(doc, "log_format", str, (), "text")
        try:
            log_format = parse_format(log_format_text)
        except ValueError:
            raise self.error(("log_format",), f"must be one of text, logfmt, json, not {log_format_text!r}") from None
        pid_text = self.get(doc, "pid_file", str, ())
        pid_file = None if pid_text is None else self.base / pid_text  # an absolute one stays as it is
        admin = self.admin(doc)
        raw = self.get(doc, "listeners", list, ())
        if not raw:
            raise self.error(("listeners",), "at least one [[listeners]] table is required")
        listeners, details = [], []
        seen: dict[tuple[str, int], int] = {}
        names: dict[str, int] = {}
        for i, table in enumerate(raw):
            path: Path_ = ("listeners", i)
            if not isinstance(table, dict):
                raise self.error(path, "must be a table ([[listeners]])")
            config, detail = self.listener(table, path)
            if table.get("name"):
                if config.name in names:
                    raise self.error(path + ("name",), f"{config.name!r} is already the name of "
                                                       f"listeners[{names[config.name]}]; names must be unique")
                names[config.name] = i
            if config.listen[1] != 0:
                if config.listen in seen:
                    raise self.error(path + ("listen",), f"same address as listeners[{seen[config.listen]}]")
                for (host, port), j in seen.items():
                    if port == config.listen[1] and _overlap(host, config.listen[0]):
                        raise self.error(path + ("listen",), f"{config.listen[0]}:{port} and listeners[{j}]'s "
                                                             f"{host}:{port} overlap ({_wildcard_of(host, config.listen[0])} "
                                                             "covers both): the second bind would fail; use one "
                                                             "listener or different ports")
                seen[config.listen] = i
            listeners.append(config)
            details.append(detail)
        warnings = [w for detail in details for w in expiry_warnings(detail["credentials"])]
        return FileConfig(path=self.path, listeners=listeners, log_level=log_level.lower(), log_format=log_format,
                          pid_file=pid_file, files=list(self.files),
                          ticket_key_files=list(self.ticket_key_files), admin=admin,
                          details=details, warnings=[*self.warnings, *warnings])

    def admin(self, doc: dict) -> AdminConfig | None:
        table = self.get(doc, "admin", dict, ())
        if table is None:
            return None
        path: Path_ = ("admin",)
        self.check_keys(table, ADMIN_KEYS, path)
        listen = self.address(table, "listen", path, listen=True)
        unix = self.get(table, "unix", str, path)
        if (listen is None) == (unix is None):
            raise self.error(path, "give exactly one of listen = \"HOST:PORT\" or unix = \"/path\"")
        allow_remote = self.get(table, "allow_remote", bool, path, False)
        if listen is not None and not allow_remote:
            from .admin import is_loopback

            if not is_loopback(listen[0]):
                raise self.error(path + ("listen",), f"{listen[0]} is not a loopback address; the admin endpoint "
                                                     "has no authentication: set allow_remote = true to expose it")
        return AdminConfig(listen=listen, unix=unix, allow_remote=allow_remote)

    def listener(self, table: dict, path: Path_) -> tuple[ProxyConfig, dict[str, Any]]:
        self.check_keys(table, LISTENER_KEYS, path)
        name = self.get(table, "name", str, path, "")
        listen = self.address(table, "listen", path, listen=True) or ("127.0.0.1", 8443)
        backend = self.address(table, "backend", path, listen=False)
        if backend is None:
            raise self.error(path + ("backend",), "is required (the default backend; routes may add more)")
        proxy_protocol = self.proxy_protocol(table, path)
        transparent = self.get(table, "transparent", bool, path, False)
        connect_timeout = self.number(table, "connect_timeout", path, 5.0)
        ktls_text = self.get(table, "ktls", str, path, "auto")
        try:
            ktls_mode = KtlsMode(ktls_text)
        except ValueError:
            raise self.error(path + ("ktls",), f"must be auto, require or off, not {ktls_text!r}") from None

        credentials: list[Credential] = []
        certs = self.get(table, "certs", list, path, [])
        for j, pair in enumerate(certs):
            cpath = path + ("certs", j)
            if not isinstance(pair, dict):
                raise self.error(cpath, "must be a table {cert = \"...\", key = \"...\"}")
            self.check_keys(pair, CERT_KEYS, cpath)
            credentials.append(self.credential(pair, cpath))

        routes_raw = self.get(table, "routes", dict, path, {})
        table_routes: dict[str, BackendSpec] = {}
        route_details = []
        for server_name, route in routes_raw.items():
            rpath = path + ("routes", server_name)
            if not isinstance(route, dict):
                raise self.error(rpath, f"must be a table [listeners.routes.\"{server_name}\"]")
            self.check_keys(route, ROUTE_KEYS, rpath)
            name_ok = re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\.?", server_name)
            if not name_ok:
                raise self.error(rpath, f"{server_name!r} is not a server name or *.suffix wildcard")
            spec = BackendSpec(
                address=self.address(route, "backend", rpath, listen=False) or backend,
                connect_timeout=self.number(route, "connect_timeout", rpath, connect_timeout),
                proxy_protocol=self.proxy_protocol(route, rpath, proxy_protocol) if "proxy_protocol" in route else proxy_protocol,
                transparent=self.get(route, "transparent", bool, rpath, transparent),
            )
            table_routes[server_name] = spec
            if ("cert" in route) != ("key" in route):
                raise self.error(rpath + ("key" if "cert" in route else "cert",), "cert and key come in pairs")
            if "cert" in route:
                cred = self.credential(route, rpath)
                credentials.append(cred)
                if not cred.matches(server_name.replace("*", "x", 1)):
                    raise self.error(rpath + ("cert",), f"the certificate ({', '.join(cred.names)}) is not valid "
                                                        f"for {server_name!r}")
            route_details.append((server_name, spec))
        if not credentials:
            raise self.error(path + ("certs",), "at least one certificate is required: "
                                                "[[listeners.certs]] cert = \"...\" key = \"...\" (or in a route)")
        tls = ServerConfig(
            certificates=CertificateStore(tuple(credentials)),
            cipher_suites=self.names(table, "ciphers", path, SUITE_NAMES) or DEFAULT_CIPHER_SUITES,
            groups=self.names(table, "groups", path, GROUP_NAMES) or DEFAULT_GROUPS,
            alpn_protocols=self.alpn(table, path),
            tickets=self.tickets(table, path),
        )
        idle = self.number(table, "idle_timeout", path, 300.0)
        config = ProxyConfig(
            listen=listen, backend=backend, tls=tls, ktls=ktls_mode,
            handshake_timeout=self.number(table, "handshake_timeout", path, 10.0),
            connect_timeout=connect_timeout,
            idle_timeout=idle or None,
            max_connections=self.number(table, "max_connections", path, 10_000, integer=True),
            backlog=self.number(table, "backlog", path, 1024, integer=True),
            routes=Routes(table_routes) if table_routes else None,
            proxy_protocol=proxy_protocol, transparent=transparent,
            name=name or f"listeners[{path[1]}]",
        )
        return config, {"credentials": credentials, "routes": route_details}


EXPIRY_WARNING_DAYS = 14


def expiry_warnings(credentials: list[Credential] | tuple[Credential, ...],
                    now: datetime.datetime | None = None) -> list[str]:
    """One line per certificate (leaf) that has expired or expires within EXPIRY_WARNING_DAYS."""
    from cryptography import x509

    now = now or datetime.datetime.now(datetime.timezone.utc)
    out = []
    for cred in credentials:
        try:
            leaf = x509.load_der_x509_certificate(cred.chain[0])
        except ValueError:
            continue
        end = leaf.not_valid_after_utc
        where = cred.source.split(" + ")[0] or ", ".join(cred.names)
        when = end.strftime("%Y-%m-%d %H:%M UTC")
        if end <= now:
            out.append(f"certificate {where} has EXPIRED: on {when} ({(now - end).days} days ago)")
        elif end - now <= datetime.timedelta(days=EXPIRY_WARNING_DAYS):
            days = (end - now).total_seconds() / 86400
            out.append(f"certificate {where} expires in {days:.1f} days, on {when}")
    return out


def _wildcard_of(a: str, b: str) -> str:
    return a if _is_wildcard(a) else b


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def _overlap(a: str, b: str) -> bool:
    """Two different listen hosts on one port where binding both fails: one of them is the
    wildcard of the other's family (``::`` is dual-stack on Linux by default: it covers IPv4 too)."""
    if a == b:
        return False

    def family(host: str) -> int:
        return 6 if ":" in host else 4

    for wild, other in ((a, b), (b, a)):
        if wild == "::":
            return True
        if wild in ("0.0.0.0", "") and family(other) == 4:
            return True
    return False


def _looks_like_ip(host: str) -> bool:
    return bool(re.fullmatch(r"[\d.]+", host)) or ":" in host


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "an array",
            dict: "a table"}.get(kind, kind.__name__)


def load_file(path: str | Path) -> FileConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, f"cannot read the configuration: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"not UTF-8 text: {exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line = int(m.group(1)) if m else None
        raise ConfigError(path, f"TOML syntax error: {exc}", line=line) from None
    return _Loader(path, text).load(doc)


def load(path: str | Path) -> list[ProxyConfig]:
    """The listeners of a configuration file, validated (certificates loaded)."""
    return load_file(path).listeners


def summary(fc: FileConfig) -> Iterator[str]:
    """What `ironsocket check` prints for a valid file."""
    yield f"{fc.path}: OK, {len(fc.listeners)} listener{'s' if len(fc.listeners) != 1 else ''}"
    for warning in fc.warnings:
        yield f"  warning: {warning}"
    yield f"  log_level: {fc.log_level}"
    yield f"  log_format: {fc.log_format.value}"
    if fc.pid_file:
        yield f"  pid_file: {fc.pid_file}"
    if fc.admin:
        where = f"{fc.admin.listen[0]}:{fc.admin.listen[1]}" if fc.admin.listen else f"unix:{fc.admin.unix}"
        yield f"  admin: {where}" + (" (remote allowed)" if fc.admin.allow_remote else "")
    for config, detail in zip(fc.listeners, fc.details):
        default = BackendSpec(address=config.backend, connect_timeout=config.connect_timeout,
                              proxy_protocol=config.proxy_protocol, transparent=config.transparent)  # type: ignore[arg-type]
        yield f"  {config.name}: {config.listen[0]}:{config.listen[1]} -> {default.describe()} [ktls {config.ktls.value}]"
        for cred in detail["credentials"]:
            yield f"    cert: {', '.join(cred.names) or '(no names)'} ({cred.source})"
        for server_name, spec in detail["routes"]:
            yield f"    route: {server_name} -> {spec.describe()}"
        if config.tls.alpn_protocols:
            yield f"    alpn: {', '.join(config.tls.alpn_protocols)}"
        yield f"    ciphers: {', '.join(s.name for s in config.tls.cipher_suites)}"
        yield f"    groups: {', '.join(g.name for g in config.tls.groups)}"
