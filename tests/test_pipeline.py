"""The composed stages: one request judged the same way from every entry point, and a bad
config caught with its file, line and key before anything starts."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from filterd import config, pipeline
from filterd.errors import FilterdError

BASE = """
[[lists]]
category = "social_networks"
path = "social"
[[lists]]
category = "bank"
path = "bank"
[categories]
social_media = ["social_networks"]
[[identity.networks]]
cidr = "10.20.0.0/16"
role = "pupil"
[proxy]
ignore_categories = ["bank"]
"""
AT = datetime(2026, 11, 25, 10, 15, tzinfo=timezone.utc)


def build(tmp_path: Path, extra: str = "") -> pipeline.Pipeline:
    (tmp_path / "social").write_text("facebook.com\n")
    (tmp_path / "bank").write_text("mybank.example\n")
    (tmp_path / "filterd.toml").write_text(BASE + extra)
    return pipeline.build(config.load(tmp_path / "filterd.toml"))


def test_request_runs_every_stage(tmp_path: Path) -> None:
    p = build(tmp_path, '[[rules]]\nname = "pupils"\ncategories = ["social_media"]\nroles = ["pupil"]\naction = "block"\n')
    v = p.request("https://m.facebook.com/x", ip="10.20.1.1", user=None, at=AT, method="GET")
    assert (v.who.role, v.what.host, v.what.categories, v.window, v.action, v.rule) == (
        "pupil", "m.facebook.com", ("social_media", "social_networks"), "out_of_hours", "block", "pupils")
    host_only = p.request("m.facebook.com", ip="10.20.1.1", user=None, at=AT, host_only=True)
    assert host_only.what.url is None and host_only.action == "block"


def test_defaults_without_rules(tmp_path: Path) -> None:
    p = build(tmp_path)
    assert p.request("https://facebook.com/", ip=None, user=None, at=AT).action == "log"
    assert p.request("https://example.org/", ip=None, user=None, at=AT).action == "allow"
    with pytest.raises(ValueError):
        p.request("http://exa mple.org:99999/", ip=None, user=None, at=AT)


def test_intercept_follows_ignore_categories(tmp_path: Path) -> None:
    p = build(tmp_path)
    assert p.intercept("www.mybank.example") is False
    assert p.intercept("facebook.com") is True


@pytest.mark.parametrize(
    "extra, line, field, words",
    [
        ('[[rules]]\nname = "x"\ncategories = ["socail_media"]\naction = "block"\n', 17, "rules[0].categories",
         "social_media"),
        ('[[rules]]\nname = "x"\nroles = ["teacher"]\naction = "block"\n', 17, "rules[0].roles", "unknown role"),
        ('[[rules]]\nname = "x"\nwindows = ["lunch"]\naction = "block"\n', 17, "rules[0].windows", "unknown window"),
    ],
)
def test_stage_errors_get_the_config_file_and_line(tmp_path: Path, extra: str, line: int, field: str,
                                                   words: str) -> None:
    with pytest.raises(FilterdError) as info:
        build(tmp_path, extra)
    err = info.value
    assert (Path(err.file).name, err.line, err.field) == ("filterd.toml", line, field)
    assert words in str(err)


def test_unknown_ignore_category_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "social").write_text("facebook.com\n")
    (tmp_path / "bank").write_text("mybank.example\n")
    (tmp_path / "filterd.toml").write_text(BASE.replace('["bank"]', '["banking"]'))
    with pytest.raises(FilterdError, match="proxy.ignore_categories: unknown categories"):
        pipeline.build(config.load(tmp_path / "filterd.toml"))
