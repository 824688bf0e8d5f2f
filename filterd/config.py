"""The configuration: one TOML file, read once into frozen, typed objects.

Every option is declared once in ``OPTIONS`` (section, key, type, default); the shipped
``config/filterd.toml`` shows each of them at its default with one line of explanation, and a
test keeps the two in step. Validation looks at the whole file before anything starts, and
every error names the file, the line (found in the TOML text) and the key, because the person
reading it is an ICT technician at a terminal, not a Python programmer.

Relative paths are relative to the config file's own folder (DESIGN.md); the files filterd
*writes* (database, outbox, compiled index, report archive) are relative to
``[storage] data_dir`` instead, so the shipped config can stay read-only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from filterd.detect import DEFAULT_DOH_HOSTS
from filterd.errors import FilterdError, parse_toml, read_text
from filterd.resources import shipped
from filterd.verdict import ACTIONS, WINDOWS

LIST_FORMATS = ("squidguard", "hosts", "domains", "urls")
SECURITY = ("none", "starttls", "tls")
STORE_FAILURE = ("enforce", "deny")


def default_path() -> Path:
    """The embedded default config, used when no ``-c`` is given."""
    return shipped("config") / "filterd.toml"


# (type, default). A type is a Python type, a tuple of allowed strings, or "list[str]".
# Tables of tables ([[lists]], [[rules]], [[identity.networks]], [categories]) are checked by
# their own functions below.
OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "school": {
        "name": (str, "Example School"),
        "ict_contact": (str, "the ICT office"),
        "logo": (str, ""),
    },
    "proxy": {
        "listen_host": (str, "127.0.0.1"),
        "listen_port": (int, 8080),
        "mode": ("str|list[str]", "regular"),
        "auth": (str, ""),
        "confdir": (str, ""),
        "upstream_ca": (str, ""),
        "ignore_categories": ("list[str]", []),
        "ignore_hosts": ("list[str]", []),
        "on_store_failure": (STORE_FAILURE, "enforce"),
        "reload_check_seconds": (int, 5),
    },
    "storage": {
        "data_dir": (str, "~/.local/state/filterd"),
        "path": (str, "filterd.db"),
        "retention_days": (int, 90),
        "batch_size": (int, 5000),
        "flush_seconds": (float, 1.0),
        "record_allowed": (bool, False),
        "index_dir": (str, "index"),
    },
    "identity": {"users": (str, ""), "school_email_domains": ("list[str]", [])},
    "timetable": {"path": (str, "")},
    "mail": {
        "from": (str, "filterd@school.example"),
        "ict": ("list[str]", ["ict@school.example"]),
        "pastoral": ("list[str]", ["pastoral@school.example"]),
        "smtp_host": (str, ""),
        "smtp_port": (int, 25),
        "security": (SECURITY, "none"),
        "username": (str, ""),
        "password_file": (str, ""),
        "ca_file": (str, ""),
        "timeout_seconds": (float, 30.0),
        "outbox": (str, "outbox"),
        "group_minutes": (int, 10),
        "max_attempts": (int, 10),
    },
    "schedule": {
        "dispatch_seconds": (int, 5),
        "weekly_report": (str, "mon 07:00"),
        "list_refresh_hours": (int, 24),
        "purge_time": (str, "02:30"),
        "daily_digest": (str, ""),
    },
    "report": {
        "archive": (str, "reports"),
        "social_categories": ("list[str]", ["social_media"]),
        "bypass_categories": ("list[str]", ["bypass"]),
    },
    "sensor": {
        "interface": (str, ""),
        "resolvers": ("list[str]", []),
        "proxy_addresses": ("list[str]", []),
        "dedupe_seconds": (int, 60),
        "stats_file": (str, "sensor-stats.json"),
        "stats_seconds": (float, 5.0),
        "school_networks": ("list[str]", []),
        "intercepted_ports": ("list[int]", []),
        "doh_hosts": ("list[str]", list(DEFAULT_DOH_HOSTS)),
        "bpf": (str, ""),
    },
}
ARRAY_TABLES = {"lists", "rules"}
LIST_KEYS = {"name": str, "category": str, "path": str, "format": LIST_FORMATS, "url": str}
NETWORK_KEYS = {"cidr": str, "role": str, "location": str}
RULE_KEYS = {"name", "categories", "roles", "windows", "action", "alert", "comment"}


@dataclass(frozen=True, slots=True)
class ListConfig:
    """One ``[[lists]]`` table: where a list is, what it is called and what it means."""

    name: str
    category: str
    path: Path
    format: str
    url: str = ""  # where the scheduler refreshes it from; empty: only re-read the file


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, validated; ``raw`` keeps the TOML tables for stage parsers."""

    file: Path
    sections: Mapping[str, Mapping[str, Any]]
    lists: tuple[ListConfig, ...]
    categories: Mapping[str, tuple[str, ...]]
    networks: tuple[Mapping[str, Any], ...]
    rules: tuple[Mapping[str, Any], ...]
    data_dir: Path
    text: str = field(repr=False, default="")

    def get(self, section: str, key: str) -> Any:
        return self.sections[section][key]

    def path(self, section: str, key: str) -> Path | None:
        """A path option resolved against the config folder; None when it is empty."""
        value = self.sections[section][key]
        return resolve(self.file.parent, value) if value else None

    def data_path(self, section: str, key: str) -> Path:
        """A path filterd writes, resolved against ``[storage] data_dir``."""
        return resolve(self.data_dir, self.sections[section][key])

    def line_of(self, dotted: str) -> int | None:
        return locate(self.text, dotted)

    @property
    def list_categories(self) -> frozenset[str]:
        """Every category a request can carry: list categories and category-map groups."""
        return frozenset(l.category for l in self.lists) | frozenset(self.categories)


def resolve(base: Path, value: str) -> Path:
    path = Path(os.path.expandvars(os.path.expanduser(value)))
    return path if path.is_absolute() else (base / path)


def load(path: str | Path | None = None) -> Config:
    """Read and validate a config file (the embedded default when ``path`` is None)."""
    file = Path(path) if path else default_path()
    text = read_text(file, "config file")
    raw = parse_toml(text, file)
    return parse(raw, file=file.resolve(), text=text)


def parse(raw: dict[str, Any], *, file: Path, text: str = "") -> Config:
    """Validate the TOML tables as a whole and build the Config."""

    def fail(dotted: str, message: str) -> FilterdError:
        return FilterdError(message, file=file, line=locate(text, dotted), field=dotted)

    for section in raw:
        if section not in OPTIONS and section not in ARRAY_TABLES and section != "categories":
            raise fail(section, f"unknown section [{section}] (known: "
                       + ", ".join(sorted({*OPTIONS, *ARRAY_TABLES, "categories"})) + ")")
    sections: dict[str, dict[str, Any]] = {}
    for section, options in OPTIONS.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise fail(section, f"[{section}] must be a table")
        values: dict[str, Any] = {}
        for key, value in given.items():
            if section == "identity" and key == "networks":
                continue
            if key not in options:
                raise fail(f"{section}.{key}", "unknown key (known: " + ", ".join(options) + ")")
            values[key] = check_type(value, options[key][0], lambda m, k=key: fail(f"{section}.{k}", m))
        for key, (_, default) in options.items():
            values.setdefault(key, default)
        sections[section] = values

    proxy, storage = sections["proxy"], sections["storage"]
    if not 0 < proxy["listen_port"] < 65536:
        raise fail("proxy.listen_port", "must be between 1 and 65535")
    for mode in [proxy["mode"]] if isinstance(proxy["mode"], str) else proxy["mode"]:
        try:
            from mitmproxy.proxy.mode_specs import ProxyMode

            ProxyMode.parse(mode)
        except ValueError as exc:
            raise fail("proxy.mode", f"not a mitmproxy mode: {mode!r} ({exc}); e.g. regular, transparent, "
                       "wireguard, socks5, regular@8081") from None
    if storage["retention_days"] < 1:
        raise fail("storage.retention_days", "must be at least 1 day")
    if storage["batch_size"] < 1 or storage["flush_seconds"] <= 0:
        raise fail("storage.batch_size", "batch_size and flush_seconds must be positive")
    if sections["schedule"]["dispatch_seconds"] < 1:
        raise fail("schedule.dispatch_seconds", "must be at least 1")
    schedule = sections["schedule"]
    if schedule["weekly_report"] and not re.fullmatch(r"(mon|tue|wed|thu|fri|sat|sun) ([01]\d|2[0-3]):[0-5]\d",
                                                      schedule["weekly_report"]):
        raise fail("schedule.weekly_report", 'must be empty (off) or look like "mon 07:00"')
    for key in ("purge_time", "daily_digest"):
        if schedule[key] and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", schedule[key]):
            raise fail(f"schedule.{key}", 'must be empty (off) or look like "16:00"')
    if schedule["list_refresh_hours"] < 0:
        raise fail("schedule.list_refresh_hours", "must be 0 (off) or more")
    for key in ("ict", "pastoral"):
        for address in sections["mail"][key]:
            if "@" not in address or any(c in address for c in "\r\n <>,"):
                raise fail(f"mail.{key}", f"not an email address: {address!r}")
    if "\n" in sections["mail"]["from"] or "@" not in sections["mail"]["from"]:
        raise fail("mail.from", "not an email address")

    base = file.parent
    data_dir = resolve(base, storage["data_dir"])
    lists = parse_lists(raw.get("lists", []), base, fail)
    categories = parse_categories(raw.get("categories", {}), fail)
    networks = parse_networks(sections["identity"] and raw.get("identity", {}).get("networks", []), fail)
    rules = raw.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise fail("rules", "rules must be [[rules]] tables")
    for i, rule in enumerate(rules):
        for key in rule:
            if key not in RULE_KEYS:
                raise fail(f"rules[{i}].{key}", "unknown key (known: " + ", ".join(sorted(RULE_KEYS)) + ")")
    for section, key in (("identity", "users"), ("timetable", "path"), ("school", "logo"),
                         ("mail", "password_file"), ("mail", "ca_file"), ("proxy", "upstream_ca")):
        value = sections[section][key]
        if value and not value.startswith("credential:") and not resolve(base, value).is_file():
            raise fail(f"{section}.{key}", f"file not found: {resolve(base, value)}")
    auth = proxy["auth"]
    if auth.startswith("ldap") and mitmproxy_version() < (12, 2, 2):
        raise fail("proxy.auth", "LDAP proxy authentication needs mitmproxy 12.2.2 or later (older versions "
                   "allow LDAP injection, CVE-2026-40606); use an htpasswd file on this Python")
    if auth.startswith("@") and not resolve(base, auth[1:]).is_file():
        raise fail("proxy.auth", f"htpasswd file not found: {resolve(base, auth[1:])}")
    return Config(file=file, sections=sections, lists=lists, categories=categories,
                  networks=networks, rules=tuple(rules), data_dir=data_dir, text=text)


def mitmproxy_version() -> tuple[int, ...]:
    from mitmproxy.version import VERSION

    return tuple(int(p) for p in re.findall(r"\d+", VERSION)[:3])


def check_type(value: Any, kind: Any, fail) -> Any:
    """Check one option's value against its declared type; ints are accepted for floats."""
    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail("must be a list of strings")
        return list(value)
    if kind == "list[int]":
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise fail("must be a list of whole numbers")
        return list(value)
    if kind == "str|list[str]":
        if isinstance(value, str):
            return value
        return check_type(value, "list[str]", fail)
    if isinstance(kind, tuple):
        if value not in kind:
            raise fail(f"must be one of {', '.join(kind)} (not {value!r})")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise fail(f"must be {kind.__name__} (not {type(value).__name__} {value!r})")
    return value


def parse_lists(raw: Any, base: Path, fail) -> tuple[ListConfig, ...]:
    if isinstance(raw, dict):  # [lists] cache_dir = ... without [[lists]]: no lists
        raw = []
    if not isinstance(raw, list):
        raise fail("lists", "lists must be [[lists]] tables")
    result, names = [], set()
    for i, table in enumerate(raw):
        where = f"lists[{i}]"
        for key in table:
            if key not in LIST_KEYS:
                raise fail(f"{where}.{key}", "unknown key (known: " + ", ".join(LIST_KEYS) + ")")
        for key in ("category", "path"):
            if key not in table:
                raise fail(where, f"missing key {key!r}")
        values = {k: check_type(v, LIST_KEYS[k], lambda m, k=k: fail(f"{where}.{k}", m))
                  for k, v in table.items()}
        path = resolve(base, values["path"])
        fmt = values.get("format", "squidguard" if path.is_dir() else "domains")
        name = values.get("name") or values["category"]
        if name in names and not values.get("name"):
            name = f"{values['category']}:{Path(values['path']).name}"
        if name in names:
            raise fail(f"{where}.name", f"two lists are called {name!r}; give one a name")
        names.add(name)
        if not path.exists() and not values.get("url"):
            raise fail(f"{where}.path", f"list not found: {path}")
        result.append(ListConfig(name=name, category=values["category"], path=path,
                                 format=fmt, url=values.get("url", "")))
    return tuple(result)


def parse_categories(raw: Any, fail) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise fail("categories", "[categories] must be a table of group = [list categories]")
    result = {}
    for group, members in raw.items():
        result[group] = tuple(check_type(members, "list[str]", lambda m, g=group: fail(f"categories.{group}", m)))
    return result


def parse_networks(raw: Any, fail) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, list):
        raise fail("identity.networks", "must be [[identity.networks]] tables")
    for i, table in enumerate(raw):
        for key, value in table.items():
            if key not in NETWORK_KEYS:
                raise fail(f"identity.networks[{i}].{key}", "unknown key (known: cidr, role, location)")
            check_type(value, NETWORK_KEYS[key], lambda m, k=key: fail(f"identity.networks[{i}].{k}", m))
        if "cidr" not in table or "role" not in table:
            raise fail(f"identity.networks[{i}]", "needs cidr and role")
    return tuple(raw)


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"]+)\s*\]\]?")
_KEY = re.compile(r'^\s*"?([A-Za-z0-9_\-]+)"?\s*=')


def locate(text: str, dotted: str) -> int | None:
    """The line of ``dotted`` (``mail.ict``, ``rules[2].action``) in the TOML text, if found.

    tomllib gives no positions, so this walks the headers and keys the way a person reads the
    file; it is only used to point at a line in an error message.
    """
    parts = re.findall(r"([^.\[\]]+)(?:\[(\d+)\])?", dotted)
    want_table = [p for p, _ in parts[:-1]] if len(parts) > 1 else []
    want_index = {".".join(q for q, _ in parts[: n + 1]): int(i)
                  for n, (_, i) in enumerate(parts) if i}
    last, last_index = parts[-1]
    counters: dict[str, int] = {}
    table: list[str] = []
    best = None
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            name = header.group(2).replace('"', "")
            table = name.split(".")
            if header.group(1) == "[[":
                counters[name] = counters.get(name, -1) + 1
            is_match = table == [p for p, _ in parts] and (not last_index or counters.get(name) == int(last_index))
            if is_match:
                return number
            continue
        key = _KEY.match(line)
        if key and key.group(1) == last and table == want_table:
            name = ".".join(table)
            if name in want_index and counters.get(name) != want_index[name]:
                continue
            return number
        if key and key.group(1) == last and best is None and not want_table:
            best = number
    return best
