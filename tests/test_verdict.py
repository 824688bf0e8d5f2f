"""The values passed between stages: event references and how a Verdict is filed."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from filterd.verdict import Verdict, What, Who, new_ref


def test_references_are_readable_and_unique() -> None:
    refs = {new_ref() for _ in range(20000)}
    assert len(refs) == 20000
    letters = set("".join(refs))
    assert letters <= set("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") and len(letters) == 32
    assert not letters & set("01OI")


@pytest.mark.parametrize(
    "action, alert, kind, event_kind, incident",
    [("allow", False, "request", "usage", False), ("log", False, "request", "usage", False),
     ("block", False, "request", "block", True), ("log", True, "request", "alert", True),
     ("block", True, "request", "block", True), ("log", False, "bypass", "bypass", True)],
)
def test_event_kind(action: str, alert: bool, kind: str, event_kind: str, incident: bool) -> None:
    v = Verdict(time=datetime.now(timezone.utc), who=Who(), what=What(host="x.example"), window="contact",
                action=action, alert=alert, kind=kind)
    assert (v.event_kind, v.is_incident) == (event_kind, incident)
