"""What to do with a request: the decide stage.

``[[rules]]`` in the config are tried in order and the first rule that matches decides
(DESIGN.md). A rule matches when every filter it has matches:

* ``categories``: the request has ANY of the rule's categories;
* ``roles``: the person's role is one of them (an unknown role, None, never matches a filter);
* ``windows``: the window is one of them (contact, non_contact, out_of_hours).

A filter that is left out matches everything. When no rule matches, a categorised request is
``log`` (it is on a list, so pastoral staff may want to see it) and anything else ``allow``;
``Verdict.rule`` is then None.

``parse_rules`` validates the raw TOML tables once at load time so that ``Policy.decide`` is a
few set look-ups per request on mitmproxy's event loop.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from filterd.errors import FilterdError
from filterd.verdict import ACTIONS, WINDOWS, Verdict, What, Who

RULE_KEYS = ("name", "action", "alert", "categories", "roles", "windows", "description")
_FILTERS = ("categories", "roles", "windows")


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[rules]]`` table. A filter of None matches anything."""

    name: str
    action: str
    alert: bool = False
    categories: frozenset[str] | None = None
    roles: frozenset[str] | None = None
    windows: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}")
        for f in _FILTERS:
            value = getattr(self, f)
            if value is not None and not isinstance(value, frozenset):
                object.__setattr__(self, f, frozenset([value] if isinstance(value, str) else value))

    def matches(self, role: str | None, categories: Iterable[str], window: str) -> bool:
        """True when every filter this rule has matches (the slow path; Policy precomputes)."""
        if self.windows is not None and window not in self.windows:
            return False
        if self.roles is not None and role not in self.roles:
            return False
        return self.categories is None or not self.categories.isdisjoint(categories)


def _suggest(value: str, known: Iterable[str]) -> str:
    near = difflib.get_close_matches(value, list(known), n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else ""


def _names(raw: object, field: str, known: frozenset[str] | None, what: str) -> frozenset[str]:
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)):
        raise FilterdError(f"must be a list of {what} names, e.g. [\"{next(iter(sorted(known or [])), 'x')}\"]",
                           field=field)
    if not raw:
        raise FilterdError(f"empty list matches nothing: leave {field.rsplit('.', 1)[1]!r} out "
                           "to match any", field=field)
    out: set[str] = set()
    for v in raw:
        if not isinstance(v, str) or not v:
            raise FilterdError(f"{what} names are text, not {v!r}", field=field)
        if known is not None and v not in known:
            shown = ", ".join(sorted(known)) if len(known) <= 12 else f"{len(known)} known"
            raise FilterdError(f"unknown {what} {v!r}{_suggest(v, known)} ({shown})", field=field)
        out.add(v)
    return frozenset(out)


def parse_rules(raw: Sequence[Mapping[str, object]], *,
                known_categories: Iterable[str] | None,
                known_roles: Iterable[str] | None) -> tuple[Rule, ...]:
    """Validate the ``[[rules]]`` tables (as tomllib gives them) into Rules, in order.

    Errors are FilterdError with ``field="rules[i].key"`` (i counts from 0); the config loader
    adds file and line. ``known_categories`` / ``known_roles`` of None skip that check (e.g.
    when the lists have not been loaded); an unknown name otherwise is an error with a
    near-miss suggestion, because a misspelt category silently never matches.
    """
    if not isinstance(raw, (list, tuple)):
        raise FilterdError("must be a list of tables ([[rules]])", field="rules")
    cats = frozenset(known_categories) if known_categories is not None else None
    roles = frozenset(known_roles) if known_roles is not None else None
    out: list[Rule] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        where = f"rules[{i}]"
        if not isinstance(item, Mapping):
            raise FilterdError("must be a table with name and action", field=where)
        for key in item:
            if key not in RULE_KEYS:
                raise FilterdError(f"unknown key {key!r}{_suggest(str(key), RULE_KEYS)} "
                                   f"(allowed: {', '.join(RULE_KEYS)})", field=f"{where}.{key}")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise FilterdError("every rule needs a name (it is shown on the block page)",
                               field=f"{where}.name")
        if name in seen:
            raise FilterdError(f"duplicate rule name {name!r} (also rules[{seen[name]}])",
                               field=f"{where}.name")
        seen[name] = i
        action = item.get("action")
        if action is None:
            raise FilterdError(f"missing action ({' | '.join(ACTIONS)})", field=f"{where}.action")
        if action not in ACTIONS:
            raise FilterdError(f"unknown action {action!r}{_suggest(str(action), ACTIONS)} "
                               f"({' | '.join(ACTIONS)})", field=f"{where}.action")
        alert = item.get("alert", False)
        if not isinstance(alert, bool):
            raise FilterdError(f"must be true or false, not {alert!r}", field=f"{where}.alert")
        desc = item.get("description")
        if desc is not None and not isinstance(desc, str):
            raise FilterdError("must be text", field=f"{where}.description")
        filters: dict[str, frozenset[str] | None] = {}
        for key, known, what in (("categories", cats, "category"), ("roles", roles, "role"),
                                 ("windows", frozenset(WINDOWS), "window")):
            filters[key] = _names(item[key], f"{where}.{key}", known, what) if key in item else None
        out.append(Rule(name=name, action=str(action), alert=alert, **filters))
    return tuple(out)


class Policy:
    """The ordered rules, ready to decide. Immutable; build a new one on reload."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        # (window, role) -> rules whose window and role filters pass, in order, with their
        # category sets: a request then costs one dict look-up and a few isdisjoint calls.
        self._cache: dict[tuple[str, str | None], tuple[tuple[Rule, frozenset[str] | None], ...]] = {}

    def _candidates(self, window: str, role: str | None) -> tuple[tuple[Rule, frozenset[str] | None], ...]:
        key = (window, role)
        found = self._cache.get(key)
        if found is None:
            found = tuple((r, r.categories) for r in self.rules
                          if (r.windows is None or window in r.windows)
                          and (r.roles is None or role in r.roles))
            if len(self._cache) < 4096:  # roles come from config: bounded in practice
                self._cache[key] = found
        return found

    def match(self, who: Who, what: What, window: str) -> Rule | None:
        """The first rule that matches, or None."""
        cats = what.categories
        for rule, rc in self._candidates(window, who.role):
            if rc is None or not rc.isdisjoint(cats):
                return rule
        return None

    def decide(self, who: Who, what: What, window: str, at: datetime, *, kind: str = "request",
               method: str | None = None, detail: str | None = None) -> Verdict:
        """The Verdict for one request: first matching rule, or the default (log/allow)."""
        if window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}")
        if at.tzinfo is None:
            raise ValueError("naive datetime: give a timezone-aware time")
        rule = self.match(who, what, window)
        if rule is None:
            return Verdict(time=at, who=who, what=what, window=window,
                           action="log" if what.categories else "allow", alert=False, rule=None,
                           kind=kind, method=method, detail=detail)
        return Verdict(time=at, who=who, what=what, window=window, action=rule.action,
                       alert=rule.alert, rule=rule.name, kind=kind, method=method, detail=detail)
