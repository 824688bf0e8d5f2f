"""Who is behind a request: the identify stage.

Four sources, in this order of trust (issue 5, DESIGN.md "identify"):

1. ``auth`` — the user name mitmproxy's ``proxyauth`` accepted (htpasswd or LDAP). For a
   CONNECT tunnel the addon passes the tunnel's user to every request inside it: this module
   never looks at flows, it is a pure function of (ip, user, at) and what it was built with.
2. ``lease`` — a DHCP lease the sensor saw for the client address: it names the device (MAC
   or hostname) and, through the lease itself or the ``devices`` column of ``users.csv``, the
   person who owns it.
3. ``network`` — ``[[identity.networks]]``: the most specific CIDR containing the address
   gives a role (and a location) to whoever is on it, e.g. the pupil Wi-Fi.
4. ``none`` — nothing is known.

Decisions worth knowing (documented for ICT in the README):

* An authenticated user who is not in ``users.csv`` keeps the name, and gets the *role of the
  network* they connect from (None when no network matches). Authentication proves the name,
  not the role; the network role is the school's statement about who sits on that network, so
  a new pupil missing from the directory still gets the pupil rules on the pupil network.
* A lease that names a device but no known user does not identify a person: the request falls
  through to the network (source ``network``, the device still filled in). Only when no
  network matches either is the source ``lease``.
* User names are matched case-insensitively (Active Directory is); a name with ``@`` is also
  looked up by e-mail address, and ``DOMAIN\\name`` by ``name``.
* IPv4-mapped IPv6 client addresses (``::ffff:10.0.0.5``, what a dual-stack listener reports
  for an IPv4 client) are treated as the IPv4 address everywhere.
"""

from __future__ import annotations

import csv
import functools
import ipaddress
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from filterd.errors import FilterdError, read_text
from filterd.verdict import Who

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

REQUIRED_COLUMNS = ("username", "role", "email")
OPTIONAL_COLUMNS = ("year", "form", "devices")

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_MAC_SEPARATED = re.compile(r"^[0-9a-f]{2}([:-])(?:[0-9a-f]{2}\1){4}[0-9a-f]{2}$")
_MAC_CISCO = re.compile(r"^[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}$")
_MAC_BARE = re.compile(r"^[0-9a-f]{12}$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                       r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_DEVICE_SPLIT = re.compile(r"[\s;]+")


# --------------------------------------------------------------------------------------------
# devices and addresses


def normalise_mac(text: str) -> str:
    """``AA-BB-CC-DD-EE-FF``, ``aabb.ccdd.eeff`` or ``aabbccddeeff`` -> ``aa:bb:cc:dd:ee:ff``.

    Leases, users.csv and the sensor all spell MACs differently; one form lets them meet.
    Raises ValueError for anything that is not a 48-bit MAC.
    """
    t = text.strip().lower()
    if _MAC_SEPARATED.match(t) or _MAC_CISCO.match(t) or _MAC_BARE.match(t):
        hexdigits = re.sub(r"[^0-9a-f]", "", t)
        return ":".join(hexdigits[i:i + 2] for i in range(0, 12, 2))
    raise ValueError(f"not a MAC address: {text!r}")


def normalise_device(text: str) -> str:
    """A MAC (normalised) or a DHCP hostname (lower case). ValueError for neither.

    A token with ``:`` or ``-`` between hex pairs, or 12 hex digits, must be a valid MAC: a
    typo in a MAC must not silently become a "hostname" that never matches.
    """
    t = text.strip().lower()
    looks_like_mac = ":" in t or bool(re.fullmatch(r"[0-9a-f]{1,2}(-[0-9a-f]{1,2})+", t)) \
        or bool(re.fullmatch(r"[0-9a-f]{12}", t)) or bool(_MAC_CISCO.match(t))
    if looks_like_mac:
        return normalise_mac(t)
    if _HOSTNAME.match(t):
        return t
    raise ValueError(f"not a MAC address or hostname: {text!r}")


def parse_ip(text: str) -> IPAddress:
    """A client address as the proxy reports it; IPv4-mapped IPv6 becomes IPv4.

    Accepts ``[::1]`` brackets and ``%zone`` suffixes. Raises ValueError.
    """
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    t = t.split("%", 1)[0]
    addr = ipaddress.ip_address(t)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=65536)
def _clean_ip(ip: str | None) -> str | None:
    """The canonical text of an address, or the text unchanged when it is not one."""
    if ip is None:
        return None
    try:
        return str(parse_ip(ip))
    except ValueError:
        return ip


# --------------------------------------------------------------------------------------------
# users.csv


@dataclass(frozen=True, slots=True)
class User:
    """One row of users.csv."""

    username: str
    role: str
    email: str
    year: str | None = None
    form: str | None = None
    devices: tuple[str, ...] = ()


class Directory:
    """The school's users (from users.csv), looked up by name, e-mail or device."""

    def __init__(self, users: Iterable[User]) -> None:
        self._by_name: dict[str, User] = {}
        self._by_email: dict[str, User] = {}
        self._by_device: dict[str, User] = {}
        for u in users:
            self._by_name[u.username.lower()] = u
            self._by_email.setdefault(u.email.lower(), u)
            for d in u.devices:
                self._by_device[d] = u
        self.roles: frozenset[str] = frozenset(u.role for u in self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[User]:
        return iter(self._by_name.values())

    def __contains__(self, user: object) -> bool:
        return isinstance(user, str) and self.get(user) is not None

    @property
    def usernames(self) -> frozenset[str]:
        """Every username as written in users.csv (for the timetable's staff check)."""
        return frozenset(u.username for u in self._by_name.values())

    def get(self, user: str) -> User | None:
        """The user called ``user`` (case-insensitive; ``DOMAIN\\name``; or an e-mail)."""
        key = user.strip().lower()
        found = self._by_name.get(key)
        if found is None and "\\" in key:
            found = self._by_name.get(key.rsplit("\\", 1)[1])
        if found is None and "@" in key:
            found = self._by_email.get(key)
        return found

    def by_device(self, device: str) -> User | None:
        """The owner of a device given as a MAC (any spelling) or a hostname."""
        try:
            key = normalise_device(device)
        except ValueError:
            return None
        return self._by_device.get(key)


def load_users(path: Path | str) -> Directory:
    """Read users.csv (UTF-8, header row; ``username,role,email`` required; ``year,form,devices``
    optional; other columns ignored) into a Directory.

    Every problem is a FilterdError naming the file, the line and the column, because this
    file is usually exported from the school's MIS and fixed by hand.
    """
    path = Path(path)
    text = read_text(path, "users file", bom=True)
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        raise FilterdError("empty file: a header row with username,role,email is required",
                           file=path, line=1) from None
    names = [h.strip().lower() for h in header]
    for col in REQUIRED_COLUMNS:
        if col not in names:
            raise FilterdError(f"missing column {col!r} in the header (found: {', '.join(names)})",
                               file=path, line=1, field=col)
    dupes = {n for n in names if n and names.count(n) > 1}
    if dupes:
        raise FilterdError(f"column {sorted(dupes)[0]!r} appears twice in the header",
                           file=path, line=1, field=sorted(dupes)[0])
    index = {n: i for i, n in enumerate(names)}

    users: list[User] = []
    seen: dict[str, int] = {}
    device_owner: dict[str, tuple[str, int]] = {}
    line = 1
    for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if row[0].lstrip().startswith("#"):
            continue

        def cell(col: str) -> str:
            i = index.get(col)
            return row[i].strip() if i is not None and i < len(row) else ""

        def err(col: str, message: str) -> FilterdError:
            return FilterdError(f"column {index[col] + 1} ({col}): {message}",
                                file=path, line=line, field=col)

        username = cell("username")
        if not username:
            raise err("username", "empty username")
        if username.lower() in seen:
            raise err("username", f"duplicate username {username!r} (first on line "
                                  f"{seen[username.lower()]})")
        seen[username.lower()] = line
        role = cell("role")
        if not role:
            raise err("role", f"empty role for {username!r}")
        email = cell("email")
        if not _EMAIL.match(email):
            raise err("email", f"bad e-mail address {email!r}")
        devices: list[str] = []
        if "devices" in index:
            for token in _DEVICE_SPLIT.split(cell("devices")):
                if not token:
                    continue
                try:
                    dev = normalise_device(token)
                except ValueError as e:
                    raise err("devices", f"bad MAC address or hostname {token!r}") from e
                owner = device_owner.get(dev)
                if owner and owner[0] != username:
                    raise err("devices", f"device {dev} is already listed for {owner[0]!r} "
                                         f"(line {owner[1]})")
                device_owner[dev] = (username, line)
                if dev not in devices:
                    devices.append(dev)
        users.append(User(username=username, role=role, email=email,
                          year=cell("year") or None, form=cell("form") or None,
                          devices=tuple(devices)))
    return Directory(users)


# --------------------------------------------------------------------------------------------
# networks


@dataclass(frozen=True, slots=True)
class Network:
    """``[[identity.networks]]``: whoever is on ``cidr`` has ``role`` (and is at ``location``)."""

    cidr: str
    role: str | None
    location: str | None = None
    network: IPNetwork = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.cidr.strip(), strict=True)  # ValueError: caller reports
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and \
                net.network_address.ipv4_mapped is not None:
            net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
        object.__setattr__(self, "network", net)


_NETWORK_KEYS = ("cidr", "role", "location")


def parse_networks(raw: Sequence[Mapping[str, object]], *,
                   known_roles: Iterable[str] | None = None) -> tuple[Network, ...]:
    """Validate ``[[identity.networks]]`` tables (as tomllib gives them).

    Errors carry ``field="identity.networks[i].key"`` (i counts from 0, as in the list);
    the config loader adds the file and line.
    """
    if not isinstance(raw, (list, tuple)):
        raise FilterdError("must be a list of tables ([[identity.networks]])",
                           field="identity.networks")
    roles = frozenset(known_roles) if known_roles is not None else None
    out: list[Network] = []
    seen: dict[IPNetwork, int] = {}
    for i, item in enumerate(raw):
        where = f"identity.networks[{i}]"
        if not isinstance(item, Mapping):
            raise FilterdError("must be a table with cidr, role and location", field=where)
        for key in item:
            if key not in _NETWORK_KEYS:
                raise FilterdError(f"unknown key {key!r} (allowed: {', '.join(_NETWORK_KEYS)})",
                                   field=f"{where}.{key}")
        cidr = item.get("cidr")
        if not isinstance(cidr, str) or not cidr.strip():
            raise FilterdError("a CIDR such as \"10.20.0.0/16\" is required", field=f"{where}.cidr")
        role = item.get("role")
        if role is not None and (not isinstance(role, str) or not role):
            raise FilterdError("must be a role name (text)", field=f"{where}.role")
        if roles is not None and role is not None and role not in roles:
            raise FilterdError(f"unknown role {role!r} (known: {', '.join(sorted(roles))})",
                               field=f"{where}.role")
        location = item.get("location")
        if location is not None and not isinstance(location, str):
            raise FilterdError("must be text", field=f"{where}.location")
        try:
            net = Network(cidr, role, location)
        except ValueError as e:
            hint = ""
            try:
                loose = ipaddress.ip_network(cidr.strip(), strict=False)
                hint = f"; did you mean {loose}?"
            except ValueError:
                pass
            raise FilterdError(f"bad CIDR {cidr!r}: {e}{hint}", field=f"{where}.cidr") from None
        if net.network in seen:
            raise FilterdError(f"{net.network} is already listed as identity.networks"
                               f"[{seen[net.network]}]", field=f"{where}.cidr")
        seen[net.network] = i
        out.append(net)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# leases


def _ts(value: float | datetime | None) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    if value.tzinfo is None:
        raise ValueError("lease times must be timezone-aware")
    return value.timestamp()


@dataclass(frozen=True, slots=True)
class Lease:
    """A DHCP lease: ``mac`` had ``ip`` from ``start`` until ``expires`` (unix seconds).

    ``start``/``expires`` may also be given as aware datetimes; they are stored as floats (the
    store's REAL columns). None means unbounded. ``mac`` is normalised when it is a MAC;
    ``hostname`` is lower-cased; ``ip`` is canonical (IPv4-mapped IPv6 becomes IPv4).
    """

    mac: str | None
    ip: str
    hostname: str | None = None
    user: str | None = None
    start: float | None = None
    expires: float | None = None

    def __post_init__(self) -> None:
        if self.mac:
            try:
                object.__setattr__(self, "mac", normalise_mac(self.mac))
            except ValueError:
                object.__setattr__(self, "mac", self.mac.strip().lower())
        if self.hostname:
            object.__setattr__(self, "hostname", self.hostname.strip().lower())
        object.__setattr__(self, "ip", _clean_ip(self.ip))
        object.__setattr__(self, "start", _ts(self.start))
        object.__setattr__(self, "expires", _ts(self.expires))

    def active(self, at: float) -> bool:
        """Start inclusive, expiry exclusive."""
        return (self.start is None or self.start <= at) and (self.expires is None or at < self.expires)


@runtime_checkable
class LeaseSource(Protocol):
    """Anything that can say which lease held an address at a time (LeaseTable, a test fake)."""

    def lookup(self, ip: str, at: datetime) -> Lease | None: ...


class LeaseTable:
    """In-memory leases by IP; the daemon refreshes it from the store with ``replace``.

    ``replace`` builds a new index and swaps it in under a lock, so ``lookup`` (on the proxy's
    event loop) never sees half a table and never waits for a refresh.
    """

    def __init__(self, leases: Iterable[Lease] = ()) -> None:
        self._lock = threading.Lock()
        self._by_ip: dict[str, tuple[Lease, ...]] = {}
        self.replace(leases)

    @staticmethod
    def _index(leases: Iterable[Lease]) -> dict[str, tuple[Lease, ...]]:
        grouped: dict[str, list[Lease]] = {}
        for lease in leases:
            grouped.setdefault(lease.ip, []).append(lease)
        # latest start first: when two leases overlap, the newer one wins
        return {ip: tuple(sorted(ls, key=lambda x: -(x.start if x.start is not None else float("-inf"))))
                for ip, ls in grouped.items()}

    def replace(self, leases: Iterable[Lease]) -> None:
        """Swap in a whole new set of leases."""
        index = self._index(leases)
        with self._lock:
            self._by_ip = index

    def add(self, lease: Lease) -> None:
        """Add one lease (the sensor, or tests) without rebuilding the rest."""
        with self._lock:
            index = dict(self._by_ip)
            index[lease.ip] = self._index([*index.get(lease.ip, ()), lease])[lease.ip]
            self._by_ip = index

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_ip.values())

    def lookup(self, ip: str, at: datetime) -> Lease | None:
        """The lease holding ``ip`` at ``at`` (aware), the latest-starting one if several."""
        if at.tzinfo is None:
            raise ValueError("naive datetime: give a timezone-aware time")
        key = _clean_ip(ip)
        t = at.timestamp()
        for lease in self._by_ip.get(key or "", ()):
            if lease.active(t):
                return lease
        return None


# --------------------------------------------------------------------------------------------
# the stage


class Identifier:
    """identify(ip, user, at) -> Who, with the precedence in the module docstring."""

    def __init__(self, directory: Directory | None, networks: Sequence[Network],
                 leases: LeaseSource | None = None) -> None:
        self.directory = directory
        self.networks = tuple(networks)
        self.leases = leases
        # most specific first, per address family, so the first hit is the answer
        self._addresses: dict[str, tuple[str | None, Network | None]] = {}
        # (ip as given, user) -> Who, when no lease applies: then the answer depends on nothing
        # else (the Identifier is rebuilt, never patched, on reload), and building a frozen Who
        # costs more than the rest of identify.
        self._plain: dict[tuple[str | None, str | None], Who] = {}
        self._v4 = tuple(sorted((n for n in self.networks if n.network.version == 4),
                                key=lambda n: -n.network.prefixlen))
        self._v6 = tuple(sorted((n for n in self.networks if n.network.version == 6),
                                key=lambda n: -n.network.prefixlen))

    def network_for(self, ip: str | None) -> Network | None:
        """The most specific configured network containing ``ip`` (None if none or not an IP)."""
        if not ip:
            return None
        try:
            addr = parse_ip(ip)
        except ValueError:
            return None
        for n in (self._v4 if addr.version == 4 else self._v6):
            if addr in n.network:
                return n
        return None

    def _address(self, ip: str | None) -> tuple[str | None, Network | None]:
        """Canonical address and its network, memoised: a school has a few thousand client
        addresses and parsing one costs more than the rest of identify together."""
        if ip is None:
            return None, None
        hit = self._addresses.get(ip)
        if hit is None:
            if len(self._addresses) >= 65536:
                self._addresses.clear()
            clean = _clean_ip(ip)
            hit = self._addresses[ip] = (clean, self.network_for(clean))
        return hit

    def _user(self, name: str | None) -> User | None:
        if not name or self.directory is None:
            return None
        return self.directory.get(name)

    def identify(self, ip: str | None, user: str | None, at: datetime) -> Who:
        """Who is behind a request from ``ip`` by authenticated ``user`` at ``at`` (aware)."""
        if at.tzinfo is None:
            raise ValueError("naive datetime: give a timezone-aware time")
        given = ip
        ip, net = self._address(ip)
        lease = self.leases.lookup(ip, at) if (self.leases is not None and ip) else None
        if lease is not None:
            return self._who(ip, net, user, lease)
        key = (given, user)
        who = self._plain.get(key)
        if who is None:
            if len(self._plain) >= 65536:
                self._plain.clear()
            who = self._plain[key] = self._who(ip, net, user, None)
        return who

    def _who(self, ip: str | None, net: Network | None, user: str | None, lease: Lease | None) -> Who:
        location = net.location if net else None
        device = (lease.mac or lease.hostname) if lease else None

        if user:
            u = self._user(user)
            if u is not None:
                return Who(ip=ip, user=u.username, role=u.role, device=device, location=location,
                           source="auth", email=u.email, year=u.year, form=u.form)
            return Who(ip=ip, user=user, role=net.role if net else None, device=device,
                       location=location, source="auth")

        if lease is not None:
            owner: User | None = None
            name = lease.user
            if name:
                owner = self._user(name)
            elif self.directory is not None:
                owner = (self.directory.by_device(lease.mac) if lease.mac else None) or \
                        (self.directory.by_device(lease.hostname) if lease.hostname else None)
                name = owner.username if owner else None
            if name:
                if owner is not None:
                    return Who(ip=ip, user=owner.username, role=owner.role, device=device,
                               location=location, source="lease", email=owner.email,
                               year=owner.year, form=owner.form)
                return Who(ip=ip, user=name, role=net.role if net else None, device=device,
                           location=location, source="lease")
            if net is None:
                return Who(ip=ip, device=device, source="lease")

        if net is not None:
            return Who(ip=ip, role=net.role, device=device, location=location, source="network")
        return Who(ip=ip, source="none")
