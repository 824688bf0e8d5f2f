"""The identify stage: users.csv, networks, leases and the precedence auth > lease > network."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from filterd.errors import FilterdError
from filterd.identify import (Identifier, Lease, LeaseSource, LeaseTable, Network, load_users,
                              normalise_device, normalise_mac, parse_ip, parse_networks)

FIX = Path(__file__).parent / "fixtures" / "users"
AT = datetime(2026, 11, 16, 10, 0, tzinfo=timezone.utc)
T = AT.timestamp()


@pytest.fixture(scope="module")
def directory():
    return load_users(FIX / "users.csv")


@pytest.fixture(scope="module")
def networks():
    return parse_networks([
        {"cidr": "10.20.0.0/16", "role": "pupil", "location": "pupil wifi"},
        {"cidr": "10.20.5.0/24", "role": "staff", "location": "staff room"},
        {"cidr": "10.0.0.0/8", "role": "guest"},
        {"cidr": "2001:db8:20::/48", "role": "pupil", "location": "pupil wifi v6"},
        {"cidr": "2001:db8:20:5::/64", "role": "staff", "location": "staff room v6"},
    ])


# -- users.csv ----------------------------------------------------------------------------------

def test_load_users(directory):
    assert len(directory) == 4
    assert directory.roles == frozenset({"staff", "pupil"})
    js = directory.get("jsmith")
    assert js.devices == ("3c:22:fb:10:20:30", "jsmith-laptop") and js.year is None
    eb = directory.get("ebrown")
    assert (eb.year, eb.form, eb.devices) == ("9", "9R", ("ebrown-ipad", "3c:22:fb:aa:bb:01"))
    assert directory.get("JSmith") is js and directory.get("SCHOOL\\jsmith") is js
    assert directory.get("j.smith@school.example") is js
    assert directory.get("nobody") is None
    assert directory.by_device("3C:22:FB:AA:BB:01") is eb
    assert directory.by_device("ebrown-iPad") is eb
    assert directory.by_device("3c22.fb10.2030") is js
    assert directory.by_device("00:00:00:00:00:00") is None
    assert directory.usernames == frozenset({"jsmith", "apatel", "ebrown", "tkhan"})


@pytest.mark.parametrize("text, out", [
    ("AA-BB-CC-DD-EE-FF", "aa:bb:cc:dd:ee:ff"), ("aabb.ccdd.eeff", "aa:bb:cc:dd:ee:ff"),
    ("AABBCCDDEEFF", "aa:bb:cc:dd:ee:ff"), ("aa:bb:cc:dd:ee:ff", "aa:bb:cc:dd:ee:ff"),
])
def test_normalise_mac(text, out):
    assert normalise_mac(text) == out
    assert normalise_device(text) == out


@pytest.mark.parametrize("text", ["aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:fg", "aa-bb:cc-dd-ee-ff",
                                  "aa:bb:cc:dd:ee:ff:00", "bad_host!", ""])
def test_bad_devices(text):
    with pytest.raises(ValueError):
        normalise_device(text)


HEADER = "username,role,email,year,form,devices\n"


@pytest.mark.parametrize("text, line, field, column, words", [
    ("username,role\njsmith,staff\n", 1, "email", None, "missing column 'email'"),
    ("user,role,email\n", 1, "username", None, "missing column 'username'"),
    ("username,role,email,role\n", 1, "role", None, "appears twice"),
    ("", 1, None, None, "empty file"),
    (HEADER + "jsmith,staff,j@s.example,,,\n,staff,x@s.example,,,\n", 3, "username", 1,
     "empty username"),
    (HEADER + "jsmith,staff,j@s.example,,,\nJSmith,staff,x@s.example,,,\n", 3, "username", 1,
     "duplicate username 'JSmith' (first on line 2)"),
    (HEADER + "jsmith,,j@s.example,,,\n", 2, "role", 2, "empty role"),
    (HEADER + "jsmith,staff,j.smith,,,\n", 2, "email", 3, "bad e-mail address 'j.smith'"),
    (HEADER + "jsmith,staff,,,,\n", 2, "email", 3, "bad e-mail"),
    (HEADER + "jsmith,staff,j@s.example,,,aa:bb:cc:dd:ee\n", 2, "devices", 6,
     "bad MAC address or hostname 'aa:bb:cc:dd:ee'"),
    (HEADER + "jsmith,staff,j@s.example,,,ok-host;aa:bb:cc:dd:ee:zz\n", 2, "devices", 6, "bad MAC"),
    (HEADER + "a,staff,a@s.example,,,aa:bb:cc:dd:ee:ff\n# note\n\nb,pupil,b@s.example,,,"
     "AA-BB-CC-DD-EE-FF\n", 5, "devices", 6, "already listed for 'a' (line 2)"),
])
def test_users_errors(tmp_path, text, line, field, column, words):
    p = tmp_path / "users.csv"
    p.write_text(text)
    with pytest.raises(FilterdError) as e:
        load_users(p)
    err = e.value
    assert (err.file, err.line, err.field) == (str(p), line, field)
    assert words in err.message
    if column is not None:
        assert f"column {column} ({field})" in err.message
    assert str(err).startswith(f"{p}:{line}: ")


def test_users_quoted_multiline_cell_keeps_line_numbers(tmp_path):
    p = tmp_path / "users.csv"
    p.write_text(HEADER + 'a,staff,a@s.example,,,"aa:bb:cc:dd:ee:01\nhost-a"\nb,staff,bad,,,\n')
    with pytest.raises(FilterdError) as e:
        load_users(p)
    assert e.value.line == 4


def test_users_missing_file(tmp_path):
    with pytest.raises(FilterdError, match="users file not found"):
        load_users(tmp_path / "nope.csv")


def test_users_bom_and_extra_columns(tmp_path):
    p = tmp_path / "users.csv"
    p.write_text("\ufeffUsername,Role,Email,Notes\nx,pupil,x@s.example,hello\n", encoding="utf-8")
    assert load_users(p).get("x").role == "pupil"


# -- networks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, field, words", [
    ([{"cidr": "10.0.0.0/8", "role": "pupil"}, {"cidr": "10.300.0.0/16", "role": "pupil"}],
     "identity.networks[1].cidr", "bad CIDR"),
    ([{"cidr": "10.20.0.1/16", "role": "pupil"}], "identity.networks[0].cidr",
     "did you mean 10.20.0.0/16?"),
    ([{"role": "pupil"}], "identity.networks[0].cidr", "required"),
    ([{"cidr": "10.0.0.0/8", "role": "pupil", "vlan": 3}], "identity.networks[0].vlan",
     "unknown key"),
    ([{"cidr": "10.0.0.0/8", "role": "pupils"}], "identity.networks[0].role", "unknown role"),
    ([{"cidr": "10.0.0.0/8", "role": 3}], "identity.networks[0].role", "must be a role"),
    ([{"cidr": "10.0.0.0/8", "role": "pupil", "location": 3}], "identity.networks[0].location",
     "must be text"),
    ([{"cidr": "10.0.0.0/8"}, {"cidr": "10.0.0.0/8"}], "identity.networks[1].cidr", "already listed"),
    (["10.0.0.0/8"], "identity.networks[0]", "must be a table"),
    ({"cidr": "10.0.0.0/8"}, "identity.networks", "list of tables"),
])
def test_network_errors(raw, field, words):
    with pytest.raises(FilterdError) as e:
        parse_networks(raw, known_roles=["pupil", "staff"])
    assert e.value.field == field and words in e.value.message


def test_ipv4_mapped_cidr_is_ipv4():
    (n,) = parse_networks([{"cidr": "::ffff:10.20.0.0/112", "role": "pupil"}])
    assert str(n.network) == "10.20.0.0/16"


@pytest.mark.parametrize("text, out", [
    ("::ffff:10.20.1.2", "10.20.1.2"), ("[2001:db8::1]", "2001:db8::1"), ("fe80::1%eth0", "fe80::1"),
    ("10.20.1.2", "10.20.1.2"),
])
def test_parse_ip(text, out):
    assert str(parse_ip(text)) == out


@pytest.mark.parametrize("ip, role, location", [
    ("10.20.1.2", "pupil", "pupil wifi"),
    ("10.20.5.9", "staff", "staff room"),          # /24 beats /16 beats /8
    ("10.99.0.1", "guest", None),
    ("::ffff:10.20.5.9", "staff", "staff room"),    # IPv4-mapped IPv6
    ("::ffff:10.20.1.2", "pupil", "pupil wifi"),
    ("2001:db8:20:5::7", "staff", "staff room v6"),
    ("2001:db8:20:9::7", "pupil", "pupil wifi v6"),
    ("192.168.1.1", None, None),
    ("not-an-ip", None, None),
])
def test_network_most_specific(networks, ip, role, location):
    who = Identifier(None, networks, None).identify(ip, None, AT)
    assert (who.role, who.location) == (role, location)
    assert who.source == ("network" if role else "none")


def test_network_order_does_not_matter(networks):
    reverse = Identifier(None, tuple(reversed(networks)), None)
    assert reverse.identify("10.20.5.1", None, AT).role == "staff"


# -- leases -------------------------------------------------------------------------------------

def test_lease_table_times_and_latest_wins():
    table = LeaseTable([
        Lease("AA-BB-CC-00-00-01", "10.20.1.2", "old-host", None, T - 7200, T - 3600),
        Lease("aa:bb:cc:00:00:02", "10.20.1.2", "mid-host", None, T - 3000, T + 3600),
        Lease("aa:bb:cc:00:00:03", "10.20.1.2", "new-host", None, T - 60, T + 3600),
        Lease("aa:bb:cc:00:00:04", "10.20.1.2", "future", None, T + 60, T + 3600),
    ])
    assert isinstance(table, LeaseSource)
    assert table.lookup("10.20.1.2", AT).hostname == "new-host"
    assert table.lookup("::ffff:10.20.1.2", AT).hostname == "new-host"
    assert table.lookup("10.20.1.2", AT - timedelta(seconds=3601)).hostname == "old-host"
    assert table.lookup("10.20.1.2", AT - timedelta(seconds=3600)) is None   # expiry exclusive
    assert table.lookup("10.20.1.2", AT - timedelta(seconds=3000)).hostname == "mid-host"
    assert table.lookup("10.20.1.2", AT - timedelta(hours=3)) is None
    assert table.lookup("10.20.1.2", AT + timedelta(seconds=60)).hostname == "future"   # start inclusive
    assert table.lookup("10.20.1.2", AT + timedelta(hours=1)) is None
    assert table.lookup("10.20.1.3", AT) is None
    assert table.lookup("10.20.1.2", AT - timedelta(seconds=3601)).mac == "aa:bb:cc:00:00:01"
    table.replace([])
    assert table.lookup("10.20.1.2", AT) is None and len(table) == 0
    table.add(Lease(None, "10.20.1.2", "X", None, datetime(2026, 1, 1, tzinfo=timezone.utc), None))
    assert table.lookup("10.20.1.2", AT).hostname == "x"
    with pytest.raises(ValueError):
        table.lookup("10.20.1.2", datetime(2026, 1, 1))


def test_lease_table_replace_is_safe_while_looking_up():
    table = LeaseTable()
    leases_a = [Lease(f"aa:bb:cc:00:{i // 256:02x}:{i % 256:02x}", f"10.1.{i // 256}.{i % 256}",
                      None, "a", None, None) for i in range(2000)]
    leases_b = [Lease(lease.mac, lease.ip, None, "b", None, None) for lease in leases_a]
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                table.replace(leases_a)
                table.replace(leases_b)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        seen = set()
        for i in range(20000):
            found = table.lookup(f"10.1.{(i % 2000) // 256}.{i % 256}", AT)
            seen.add(found.user if found else None)
    finally:
        stop.set()
        t.join()
    assert not errors
    assert seen <= {"a", "b", None} and seen & {"a", "b"}


# -- precedence ---------------------------------------------------------------------------------

@pytest.fixture()
def ident(directory, networks):
    leases = LeaseTable([
        Lease("3c:22:fb:aa:bb:01", "10.20.1.10", "somename", None, T - 60, T + 3600),  # ebrown's MAC
        Lease("00:11:22:33:44:55", "10.20.1.11", "EBrown-iPad", None, T - 60, T + 3600),  # by hostname
        Lease("00:11:22:33:44:66", "10.20.1.12", "kiosk", "tkhan", T - 60, T + 3600),   # lease names user
        Lease("00:11:22:33:44:77", "10.20.1.13", "unknown-dev", None, T - 60, T + 3600),
        Lease("00:11:22:33:44:88", "192.168.9.9", None, None, T - 60, T + 3600),
        Lease("00:11:22:33:44:99", "10.20.1.14", None, "visitor", T - 60, T + 3600),
        Lease("3c:22:fb:aa:bb:01", "10.20.1.15", None, None, T - 7200, T - 3600),      # expired
    ])
    return Identifier(directory, networks, leases)


def test_auth_beats_lease_and_network(ident):
    who = ident.identify("10.20.1.10", "jsmith", AT)
    assert (who.user, who.role, who.source, who.email) == ("jsmith", "staff", "auth",
                                                           "j.smith@school.example")
    assert who.device == "3c:22:fb:aa:bb:01"  # the lease still names the device
    assert who.location == "pupil wifi"


def test_auth_user_gets_directory_details(ident):
    who = ident.identify("10.99.0.1", "EBROWN", AT)
    assert (who.user, who.role, who.year, who.form) == ("ebrown", "pupil", "9", "9R")


def test_auth_user_not_in_directory_gets_network_role(ident):
    who = ident.identify("::ffff:10.20.1.99", "newpupil", AT)
    assert (who.user, who.role, who.source, who.ip) == ("newpupil", "pupil", "auth", "10.20.1.99")
    off = ident.identify("192.168.1.1", "newpupil", AT)
    assert (off.user, off.role, off.source) == ("newpupil", None, "auth")


@pytest.mark.parametrize("ip, user, role, device", [
    ("10.20.1.10", "ebrown", "pupil", "3c:22:fb:aa:bb:01"),    # MAC in users.csv devices
    ("10.20.1.11", "ebrown", "pupil", "00:11:22:33:44:55"),    # hostname in users.csv devices
    ("10.20.1.12", "tkhan", "pupil", "00:11:22:33:44:66"),     # user named by the lease
    ("10.20.1.14", "visitor", "pupil", "00:11:22:33:44:99"),   # lease user not in directory
])
def test_lease_beats_network(ident, ip, user, role, device):
    who = ident.identify(ip, None, AT)
    assert (who.user, who.role, who.device, who.source) == (user, role, device, "lease")


def test_lease_without_user_falls_through_to_network(ident):
    who = ident.identify("10.20.1.13", None, AT)
    assert (who.user, who.role, who.device, who.source) == (None, "pupil", "00:11:22:33:44:77",
                                                            "network")
    who = ident.identify("192.168.9.9", None, AT)
    assert (who.user, who.role, who.device, who.source) == (None, None, "00:11:22:33:44:88", "lease")


def test_expired_lease_is_ignored(ident):
    who = ident.identify("10.20.1.15", None, AT)
    assert (who.user, who.source) == (None, "network")


def test_nothing_known(ident):
    assert ident.identify("172.16.0.1", None, AT).source == "none"
    who = ident.identify(None, None, AT)
    assert (who.ip, who.user, who.role, who.source) == (None, None, None, "none")


def test_no_directory_no_leases(networks):
    who = Identifier(None, networks).identify("10.20.1.2", "jsmith", AT)
    assert (who.user, who.role, who.source) == ("jsmith", "pupil", "auth")


def test_naive_time_rejected(ident):
    with pytest.raises(ValueError):
        ident.identify("10.20.1.2", None, datetime(2026, 11, 16, 10, 0))


def test_network_direct():
    n = Network("10.0.0.0/8", "pupil")
    assert str(n.network) == "10.0.0.0/8"
    with pytest.raises(ValueError):
        Network("10.0.0.1/8", "pupil")
