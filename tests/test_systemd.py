"""The shipped systemd units: they verify, they are hardened, and each has only the
capability it needs. ``systemd-analyze verify`` checks that ExecStart exists, so the test
verifies copies whose ExecStart points at this venv's ``filterd`` instead of /opt/filterd."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
INSTALLED = "/opt/filterd/venv/bin/filterd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def settings(name: str) -> dict[str, list[str]]:
    """Key -> every value it is given in the [Service] section (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def local_copy(name: str, tmp_path: Path) -> Path:
    exe = Path(sys.executable).with_name("filterd")
    if not exe.exists():
        pytest.skip(f"no filterd console script next to {sys.executable}")
    text = (UNITS / name).read_text()
    assert INSTALLED in text
    dest = tmp_path / name
    dest.write_text(text.replace(INSTALLED, str(exe)))
    return dest


@needs_analyze
def test_units_verify(tmp_path: Path) -> None:
    units = [local_copy(n, tmp_path) for n in ("filterd.service", "filterd-sensor.service")]
    run = subprocess.run([ANALYZE, "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr


@needs_analyze
@pytest.mark.parametrize(("name", "limit"), [("filterd.service", 3.0), ("filterd-sensor.service", 3.0)])
def test_exposure_is_low(name: str, limit: float) -> None:
    run = subprocess.run([ANALYZE, "security", "--offline=true", f"--threshold={int(limit * 10)}",
                          str(UNITS / name)], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
    assert found, run.stdout + run.stderr
    assert float(found.group(1)) <= limit
    assert run.returncode == 0


@pytest.mark.parametrize(("name", "caps", "families"), [
    ("filterd.service", "", {"AF_INET", "AF_INET6", "AF_UNIX"}),
    ("filterd-sensor.service", "CAP_NET_RAW", {"AF_INET", "AF_INET6", "AF_UNIX", "AF_PACKET", "AF_NETLINK"}),
])
def test_least_privilege(name: str, caps: str, families: set[str]) -> None:
    s = settings(name)
    assert s["CapabilityBoundingSet"] == [caps] and s["AmbientCapabilities"] == [caps]
    assert set(s["RestrictAddressFamilies"][0].split()) == families
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes",
                       "UMask": "0077", "StateDirectory": "filterd", "User": "filterd",
                       "Restart": "on-failure"}.items():
        assert s[key] == [value], key
    assert s["SystemCallFilter"][0] == "@system-service"
    assert s["ExecStart"][0].startswith(f"{INSTALLED} -c /etc/filterd/filterd.toml ")


def test_daemon_gets_the_smtp_password_as_a_credential() -> None:
    assert settings("filterd.service")["LoadCredential"] == ["smtp-password:/etc/filterd/smtp-password"]
    assert "LoadCredential" not in settings("filterd-sensor.service")


def test_write_execute_memory_only_where_tls_interception_needs_it() -> None:
    # mitmproxy's pyOpenSSL callbacks need W+X memory (measured: TLS fails under MDWE);
    # the sensor parses TLS and QUIC without callbacks, so it keeps the protection.
    assert settings("filterd.service")["MemoryDenyWriteExecute"] == ["no"]
    assert settings("filterd-sensor.service")["MemoryDenyWriteExecute"] == ["yes"]
