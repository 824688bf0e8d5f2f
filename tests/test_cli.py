"""The command line as a person uses it: real processes, the embedded default or a temporary
config, exit statuses and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def filterd(*args: str, stdin: str | None = None, env_home: Path | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_home is not None:
        env["HOME"] = str(env_home)  # the embedded default's data_dir is under ~
    return subprocess.run([sys.executable, "-m", "filterd", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


def test_check_json_lines_on_the_embedded_default(home: Path) -> None:
    out = filterd("check", "--json", "--user", "jsmith", "--at", "2026-11-25T10:15",
                  "http://terrorism-test.filterd.invalid/", "https://WWW.Facebook.com./x", env_home=home)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["action"] for r in rows] == ["block", "log"]
    first, second = rows
    for key in ("url", "host", "categories", "matches", "user", "role", "window", "action", "alert", "rule"):
        assert key in first
    assert first["alert"] is True and first["rule"] == "terrorism"
    assert first["matches"][0] == {"list": "terrorism-canary", "category": "terrorism",
                                   "entry": "terrorism-test.filterd.invalid"}
    assert second["host"] == "www.facebook.com" and "social_media" in second["categories"]
    assert (second["user"], second["role"]) == ("jsmith", "staff")


def test_check_reads_stdin_and_a_bad_url_gets_its_own_line(home: Path) -> None:
    out = filterd("check", "-", "--json", stdin="http://youtube.com/\nhttp://exa mple.com:99999/\n"
                  "# a comment\nhttps://xn--bcher-kva.example/\n", env_home=home)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 3
    assert "error" in rows[1] and rows[1]["url"] == "http://exa mple.com:99999/"
    assert rows[0]["action"] in ("log", "block") and rows[2]["action"] == "allow"
    assert out.returncode == 1  # a user error happened, but every URL was answered


def test_check_text_output_and_ip_identity(home: Path) -> None:
    out = filterd("check", "https://www.tiktok.com/", "--ip", "10.20.3.4", "--at", "2026-11-25T10:15",
                  env_home=home)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("block") and "role=pupil" in out.stdout and "window=contact" in out.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["check", "http://x/", "--at", "yesterday"], "--at: not an ISO-8601 time"),
        (["events", "--kind", "nonsense"], "--kind: unknown kind"),
        (["-c", "/nonexistent/filterd.toml", "config", "check"], "config file not found"),
        (["timetable", "show", "--week", "2026-W99"], "W99"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(home: Path, args: list[str], words: str) -> None:
    out = filterd(*args, env_home=home)
    assert out.returncode == 1
    assert words in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_config_check_names_file_line_and_key(tmp_path: Path, home: Path) -> None:
    cfg = tmp_path / "filterd.toml"
    cfg.write_text('[[rules]]\nname = "x"\ncategories = ["socail_media"]\naction = "block"\n')
    out = filterd("-c", str(cfg), "config", "check", env_home=home)
    assert out.returncode == 1
    assert out.stderr.startswith(f"filterd: {cfg}:3: rules[0].categories: ")


def test_config_check_ok_on_the_embedded_default(home: Path) -> None:
    out = filterd("config", "check", env_home=home)
    assert out.returncode == 0, out.stderr
    assert ": OK" in out.stdout


def test_lists_shows_every_list(home: Path) -> None:
    out = filterd("lists", "--json", env_home=home)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {"name", "category", "source", "entries", "skipped", "load_seconds"} <= set(rows[0])
    assert any(r["category"] == "terrorism" for r in rows)


def test_timetable_show_prints_a_grid(home: Path) -> None:
    out = filterd("timetable", "show", "--week", "2026-W48", env_home=home)
    assert out.returncode == 0, out.stderr
    assert "contact" in out.stdout and "mon" in out.stdout.lower()


def test_every_command_has_help_with_an_example() -> None:
    from click.testing import CliRunner

    from filterd.cli import cli

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from walk(cmd, prefix + [name])
            else:
                yield prefix + [name], cmd

    for path, cmd in walk(cli, []):
        assert cmd.help and "Example:" in cmd.help, f"filterd {' '.join(path)} has no example in its help"
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0


def test_import_events_alerts_report_export_purge_backup(tmp_path: Path) -> None:
    """A day in the life: import a Squid log, read events and alerts, write the weekly report,
    answer a subject access request, back up, then erase one person."""
    home = tmp_path / "home"
    log = tmp_path / "access.log"
    # 2026-11-25 10:15 UTC is lesson time (P2) in the shipped timetable; 10.20/16 is the pupil network
    log.write_text("1795601700.000 10 10.20.3.4 TCP_MISS/200 500 GET http://www.facebook.com/ jdoe HIER_DIRECT/1.2.3.4 text/html\n"
                   "1795601760.000 10 10.20.3.4 TCP_DENIED/403 500 GET http://terrorism-test.filterd.invalid/x jdoe HIER_NONE/- text/html\n"
                   "1795601820.000 10 10.20.3.9 TCP_MISS/200 500 GET http://www.youtube.com/watch?v=1 - HIER_DIRECT/1.2.3.4 text/html\n")
    out = filterd("import", "squid-log", str(log), env_home=home)
    assert out.returncode == 0, out.stderr
    assert "3 imported" in out.stdout or "3 lines" in out.stdout
    again = filterd("import", "squid-log", str(log), "--workers", "1", env_home=home)
    assert again.returncode == 0 and "0 imported" in again.stdout  # nothing counted twice

    rows = [json.loads(l) for l in filterd("events", "--json", env_home=home).stdout.splitlines()]
    # pupils in a lesson: social media blocked too; every request also counts in usage
    assert sorted((r["kind"], r["rule"]) for r in rows if r["kind"] != "usage") == [
        ("block", "pupil-social-media-in-lessons"), ("block", "pupil-social-media-in-lessons"),
        ("block", "terrorism")]
    assert sum(r["requests"] for r in rows if r["kind"] == "usage") == 3
    block = next(r for r in rows if r["rule"] == "terrorism")
    assert block["user"] == "jdoe" and block["rule"] == "terrorism"
    assert block["time"].endswith("+00:00") and block["url"] == "http://terrorism-test.filterd.invalid/x"
    assert [json.loads(l)["kind"] for l in filterd("events", "--json", "--user", "jdoe", "--kind", "block",
                                                       env_home=home).stdout.splitlines()] == ["block", "block"]

    alerts = filterd("alerts", "--json", env_home=home)
    assert alerts.returncode == 0 and alerts.stdout == ""  # a backfill of old lines mails nobody

    report = filterd("report", "weekly", "--week", "2026-W48", "--out", str(tmp_path / "r"), env_home=home)
    assert report.returncode == 0, report.stderr
    csv_text = (tmp_path / "r" / "weekly-2026-W48.csv").read_text()
    assert csv_text.startswith("user,role,category,window,requests,blocked,active_minutes")
    assert "jdoe,pupil" in csv_text

    export = filterd("export", "--user", "jdoe", "--out", str(tmp_path / "sar"), env_home=home)
    assert export.returncode == 0, export.stderr
    data = json.loads((tmp_path / "sar" / "filterd-export-jdoe.json").read_text())
    assert data["user"] == "jdoe" and any(e["ref"] == block["ref"] for e in data["events"])

    backup = filterd("backup", str(tmp_path / "copy.db"), env_home=home)
    assert backup.returncode == 0 and (tmp_path / "copy.db").stat().st_size > 0

    purge = filterd("purge", "--user", "jdoe", "--yes", env_home=home)
    assert purge.returncode == 0, purge.stderr
    assert filterd("events", "--json", "--user", "jdoe", env_home=home).stdout == ""
    assert "10.20.3.9" in filterd("events", env_home=home).stdout  # other people's records stay
