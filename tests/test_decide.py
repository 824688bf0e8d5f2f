"""The decide stage: first match wins, filters, defaults, and rule validation."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from filterd.decide import Policy, Rule, parse_rules
from filterd.errors import FilterdError
from filterd.verdict import Match, What, Who

AT = datetime(2026, 11, 16, 10, 0, tzinfo=timezone.utc)
CATS = {"terrorism", "social_networks", "social_media", "vpn", "redirector", "doh", "chat", "games"}
ROLES = {"staff", "pupil"}

# the shipped policy's shape (issue 5, item 4)
RAW = [
    {"name": "terrorism", "categories": ["terrorism"], "action": "block", "alert": True},
    {"name": "bypass", "categories": ["vpn", "redirector", "doh"], "action": "block", "alert": True},
    {"name": "pupil-social-lessons", "roles": ["pupil"], "categories": ["social_media"],
     "windows": ["contact"], "action": "block"},
    {"name": "staff-social-contact", "roles": ["staff"], "categories": ["social_media"],
     "windows": ["contact"], "action": "log"},
    {"name": "staff-social-free", "roles": ["staff"], "categories": ["social_media"],
     "action": "allow", "description": "policy 6.9: non-contact time"},
    {"name": "games-out-of-hours", "categories": ["games"], "windows": ["out_of_hours"],
     "action": "allow"},
]


@pytest.fixture(scope="module")
def policy():
    return Policy(parse_rules(RAW, known_categories=CATS, known_roles=ROLES))


def what(*cats: str) -> What:
    return What(host="example.com", url="http://example.com/", categories=cats,
                matches=tuple(Match("ut1", c, "example.com") for c in cats))


PUPIL = Who(ip="10.20.1.2", user="ebrown", role="pupil", source="auth")
STAFF = Who(ip="10.20.5.2", user="jsmith", role="staff", source="auth")
NOBODY = Who(ip="10.30.0.1")


@pytest.mark.parametrize("who, cats, window, action, alert, rule", [
    (PUPIL, ("terrorism",), "out_of_hours", "block", True, "terrorism"),
    (STAFF, ("terrorism", "social_media"), "non_contact", "block", True, "terrorism"),  # first wins
    (NOBODY, ("social_media", "vpn"), "contact", "block", True, "bypass"),
    (PUPIL, ("social_networks", "social_media"), "contact", "block", False, "pupil-social-lessons"),
    (PUPIL, ("social_media",), "non_contact", "log", False, None),     # no rule: categorised
    (STAFF, ("social_media",), "contact", "log", False, "staff-social-contact"),
    (STAFF, ("social_media",), "non_contact", "allow", False, "staff-social-free"),
    (STAFF, ("social_media",), "out_of_hours", "allow", False, "staff-social-free"),
    (NOBODY, ("social_media",), "contact", "log", False, None),          # role None: no role rule
    (PUPIL, ("games",), "out_of_hours", "allow", False, "games-out-of-hours"),
    (PUPIL, ("games",), "contact", "log", False, None),
    (PUPIL, (), "contact", "allow", False, None),                          # uncategorised
    (STAFF, ("chat",), "contact", "log", False, None),
])
def test_decisions(policy, who, cats, window, action, alert, rule):
    v = policy.decide(who, what(*cats), window, AT)
    assert (v.action, v.alert, v.rule) == (action, alert, rule)
    assert (v.who, v.window, v.time, v.kind) == (who, window, AT, "request")
    assert v.what.categories == cats


def test_first_match_wins_by_order():
    a = Rule("a", "allow", categories=frozenset({"chat"}))
    b = Rule("b", "block", alert=True, categories=frozenset({"chat"}))
    assert Policy([a, b]).decide(PUPIL, what("chat"), "contact", AT).rule == "a"
    assert Policy([b, a]).decide(PUPIL, what("chat"), "contact", AT).rule == "b"


def test_catch_all_rule():
    p = Policy([Rule("everything", "block", categories=None)])
    v = p.decide(NOBODY, what(), "out_of_hours", AT)
    assert (v.action, v.rule) == ("block", "everything")


def test_rule_accepts_plain_iterables():
    r = Rule("r", "log", categories=["chat"], roles="pupil", windows=("contact",))
    assert r.categories == frozenset({"chat"}) and r.roles == frozenset({"pupil"})
    assert r.matches("pupil", ["chat", "x"], "contact") and not r.matches("staff", ["chat"], "contact")
    with pytest.raises(ValueError):
        Rule("r", "deny")


def test_bypass_kind_and_details(policy):
    v = policy.decide(PUPIL, What(host="dns.example", categories=("doh",)), "contact", AT,
                      kind="bypass", method="CONNECT", detail="DoT to 1.1.1.1:853")
    assert (v.kind, v.method, v.detail, v.rule, v.action) == ("bypass", "CONNECT",
                                                              "DoT to 1.1.1.1:853", "bypass", "block")
    assert v.is_incident and v.event_kind == "bypass"


def test_decide_rejects_bad_input(policy):
    with pytest.raises(ValueError, match="window"):
        policy.decide(PUPIL, what(), "lunch", AT)
    with pytest.raises(ValueError, match="naive"):
        policy.decide(PUPIL, what(), "contact", datetime(2026, 11, 16, 10, 0))


def test_cache_does_not_leak_between_roles(policy):
    # the (window, role) candidate cache must keep roles apart
    assert policy.decide(PUPIL, what("social_media"), "contact", AT).action == "block"
    assert policy.decide(STAFF, what("social_media"), "contact", AT).action == "log"
    assert policy.decide(PUPIL, what("social_media"), "contact", AT).action == "block"


def test_unknown_checks_can_be_skipped():
    (r,) = parse_rules([{"name": "x", "categories": ["anything"], "roles": ["whoever"],
                         "action": "log"}], known_categories=None, known_roles=None)
    assert r.categories == frozenset({"anything"})


def _rules(*extra: dict) -> list[dict]:
    return [{"name": "ok", "action": "log"}, *extra]


@pytest.mark.parametrize("raw, field, words", [
    (_rules({"action": "block"}), "rules[1].name", "needs a name"),
    (_rules({"name": "  ", "action": "block"}), "rules[1].name", "needs a name"),
    (_rules({"name": "ok", "action": "block"}), "rules[1].name", "duplicate rule name 'ok' (also rules[0])"),
    (_rules({"name": "x"}), "rules[1].action", "missing action"),
    (_rules({"name": "x", "action": "deny"}), "rules[1].action", "unknown action 'deny'"),
    (_rules({"name": "x", "action": "blok"}), "rules[1].action", "did you mean 'block'?"),
    (_rules({"name": "x", "action": "block", "alert": "yes"}), "rules[1].alert", "true or false"),
    (_rules({"name": "x", "action": "block", "alert": 1}), "rules[1].alert", "true or false"),
    (_rules({"name": "x", "action": "block", "categories": ["terorism"]}), "rules[1].categories",
     "unknown category 'terorism'; did you mean 'terrorism'?"),
    (_rules({"name": "x", "action": "block", "categories": "terrorism"}), "rules[1].categories",
     "must be a list"),
    (_rules({"name": "x", "action": "block", "categories": []}), "rules[1].categories",
     "empty list matches nothing"),
    (_rules({"name": "x", "action": "block", "categories": [3]}), "rules[1].categories", "are text"),
    (_rules({"name": "x", "action": "block", "roles": ["pupils"]}), "rules[1].roles",
     "unknown role 'pupils'; did you mean 'pupil'?"),
    (_rules({"name": "x", "action": "block", "windows": ["noncontact"]}), "rules[1].windows",
     "unknown window 'noncontact'; did you mean 'non_contact'?"),
    (_rules({"name": "x", "action": "block", "window": ["contact"]}), "rules[1].window",
     "unknown key 'window'; did you mean 'windows'?"),
    (_rules({"name": "x", "action": "block", "description": 3}), "rules[1].description", "text"),
    (_rules("not a table"), "rules[1]", "must be a table"),
    ({"name": "x"}, "rules", "list of tables"),
])
def test_rule_errors(raw, field, words):
    with pytest.raises(FilterdError) as e:
        parse_rules(raw, known_categories=CATS, known_roles=ROLES)
    assert e.value.field == field
    assert words in e.value.message
    assert e.value.file is None and e.value.line is None   # the config loader adds them
    assert str(e.value).startswith(f"{field}: ")


def test_match_is_fast(policy):
    import time
    w = what("social_media", "chat", "games")
    start = time.perf_counter()
    for _ in range(50000):
        policy.match(STAFF, w, "contact")
    # ~2 µs per match here; the bound only catches an accidental O(rules x categories) path
    assert time.perf_counter() - start < 1.5
