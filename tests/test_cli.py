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
