"""The config loader: defaults, the shipped file documenting every option, and errors that
name the file, line and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from filterd import config
from filterd.errors import FilterdError

SHIPPED = config.default_path()
EXAMPLE_DATA = {("identity", "users"), ("timetable", "path")}


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "lists").mkdir(exist_ok=True)
    (tmp_path / "lists" / "social").write_text("facebook.com\n")
    path = tmp_path / "filterd.toml"
    path.write_text(text)
    return path


def test_shipped_config_loads_and_documents_every_option() -> None:
    cfg = config.load(SHIPPED)
    text = SHIPPED.read_text()
    for section, options in config.OPTIONS.items():
        assert re.search(rf"^\[{section}\]", text, re.M), f"[{section}] missing from {SHIPPED}"
        for key, (_, default) in options.items():
            line = next((l for l in text.splitlines() if re.match(rf"{re.escape(key)}\s*=", l)), None)
            assert line is not None, f"{section}.{key} is not shown in {SHIPPED}"
            assert "#" in line, f"{section}.{key} has no one-line explanation"
            if (section, key) in EXAMPLE_DATA:
                continue  # the shipped example school's files; the default is "" (none)
            assert cfg.get(section, key) == default, f"{section}.{key} is not shown at its default"


def test_defaults_when_sections_missing(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, ""))
    assert cfg.get("proxy", "listen_port") == 8080
    assert cfg.get("storage", "retention_days") == 90
    assert cfg.lists == ()


def test_relative_paths_are_relative_to_the_config_folder(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[[lists]]\ncategory = "social"\npath = "lists/social"\n'))
    assert cfg.lists[0].path == tmp_path / "lists" / "social"
    assert cfg.lists[0].format == "domains"
    assert cfg.list_categories == {"social"}


@pytest.mark.parametrize(
    "text, line, field, words",
    [
        ('[proxy]\nlisten_port = "80"\n', 2, "proxy.listen_port", "must be int"),
        ('[proxy]\nlisten_port = 70000\n', 2, "proxy.listen_port", "between 1 and 65535"),
        ('[proxy]\nlisten_prot = 8080\n', 2, "proxy.listen_prot", "unknown key"),
        ('[proxyy]\n', 1, "proxyy", "unknown section"),
        ('[proxy]\nmode = 3\n', 2, "proxy.mode", "list of strings"),
        ('[proxy]\nmode = "transparant"\n', 2, "proxy.mode", "not a mitmproxy mode"),
        ('[proxy]\nmode = ["regular", "socks5:foo"]\n', 2, "proxy.mode", "not a mitmproxy mode"),
        ('[storage]\nretention_days = 0\n', 2, "storage.retention_days", "at least 1"),
        ('[mail]\n\nict = ["not-an-address"]\n', 3, "mail.ict", "not an email"),
        ('[proxy]\non_store_failure = "maybe"\n', 2, "proxy.on_store_failure", "must be one of"),
        ('[[lists]]\ncategory = "a"\npath = "lists/social"\n[[lists]]\ncategory = "b"\npath = "nope"\n',
         6, "lists[1].path", "list not found"),
        ('[[lists]]\ncategory = "a"\npath = "lists/social"\nformat = "csv"\n', 4, "lists[0].format", "must be one of"),
        ('[[lists]]\npath = "lists/social"\n', 1, "lists[0]", "missing key 'category'"),
        ('[identity]\nusers = "missing.csv"\n', 2, "identity.users", "file not found"),
        ('[[identity.networks]]\ncidr = "10.0.0.0/8"\nrole = "staff"\n[[identity.networks]]\ncidr = "10.1.0.0/16"\nrole = "pupil"\nroom = 1\n',
         7, "identity.networks[1].room", "unknown key"),
        ('[[rules]]\nname = "a"\naction = "block"\n[[rules]]\nname = "b"\nactoin = "log"\n', 6, "rules[1].actoin", "unknown key"),
        ('[schedule]\nweekly_report = "monday 7am"\n', 2, "schedule.weekly_report", "mon 07:00"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, line: int, field: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(FilterdError) as info:
        config.load(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), line, field)
    assert words in str(err)
    assert str(err).startswith(f"{path}:{line}: {field}: ")


def test_invalid_toml_gives_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[proxy]\nlisten_port = = 3\n")
    with pytest.raises(FilterdError) as info:
        config.load(path)
    assert info.value.line == 2 and "not valid TOML" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FilterdError, match="config file not found"):
        config.load(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "dotted, line",
    [("proxy.listen_port", 3), ("rules[1].action", 9), ("rules[0]", 5), ("mail", 10), ("mail.ict", 11)],
)
def test_locate(dotted: str, line: int) -> None:
    text = ("[proxy]\nlisten_host = 'x'\nlisten_port = 1\n\n[[rules]]\naction = 'log'\n[[rules]]\nname = 'b'\n"
            "action = 'block'\n[mail]\nict = []\n")
    assert config.locate(text, dotted) == line
