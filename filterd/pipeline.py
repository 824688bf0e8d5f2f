"""The four deciding stages composed: identify → classify → window → decide.

The proxy addon, ``filterd check``, the Squid log import and the sensor all decide through
this one object, so a request is judged the same way wherever it comes from.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from filterd import classify, decide, formcheck, identify, window
from filterd.config import Config
from filterd.errors import FilterdError
from filterd.verdict import Verdict, What

log = logging.getLogger("filterd.pipeline")


@dataclass(frozen=True)
class Pipeline:
    """Everything needed to judge one request; rebuilt whole on reload, never patched."""

    identifier: identify.Identifier
    classifier: classify.Classifier
    timetable: window.Timetable | None
    policy: decide.Policy
    ignore_categories: frozenset[str] = frozenset()
    school_email: re.Pattern[bytes] | None = None  # policy 6.6 (formcheck)
    social_categories: frozenset[str] = frozenset()

    def request(
        self,
        url_or_host: str,
        *,
        ip: str | None,
        user: str | None,
        at: datetime,
        method: str | None = None,
        host_only: bool = False,
        kind: str = "request",
        detail: str | None = None,
        form: bytes | None = None,
    ) -> Verdict:
        """Judge one request (or, with ``host_only``, one host seen at CONNECT/SNI time).

        ``form`` is a request body the caller holds in memory; it is only searched for a school
        email address when it goes to a social-media host (policy 6.6), and never kept.
        """
        who = self.identifier.identify(ip, user, at)
        what = self.classify(url_or_host, host_only=host_only)
        if form and self.school_email is not None and not self.social_categories.isdisjoint(what.categories):
            domain = formcheck.school_email_in(form, self.school_email)
            if domain:
                what = replace(what, categories=tuple(sorted({*what.categories, formcheck.SCHOOL_EMAIL})))
                detail = f"school email address (@{domain}) sent in a form"
        when = self.timetable.window(at, who.user, who.role) if self.timetable else "out_of_hours"
        return self.policy.decide(who, what, when, at, kind=kind, method=method, detail=detail)

    def classify(self, url_or_host: str, *, host_only: bool = False) -> What:
        if host_only:
            return self.classifier.classify_host(url_or_host)
        return self.classifier.classify(url_or_host)

    def intercept(self, host: str) -> bool:
        """Whether TLS to ``host`` may be intercepted (banking, health... are not)."""
        if not self.ignore_categories:
            return True
        try:
            categories = self.classifier.classify_host(host).categories
        except ValueError:
            return True
        return not self.ignore_categories.intersection(categories)


def build(config: Config, *, leases: identify.LeaseSource | None = None) -> Pipeline:
    """Load every file the config points at and build a Pipeline; FilterdError on bad input."""
    specs = [classify.ListSpec(name=l.name, category=l.category, path=l.path, format=l.format)
             for l in config.lists]
    cache_dir = config.data_path("storage", "index_dir")
    classifier = classify.Classifier.build(specs, cache_dir, groups=config.categories)

    users_path = config.path("identity", "users")
    directory = identify.load_users(users_path) if users_path else None
    try:
        networks = identify.parse_networks(list(config.networks))
    except FilterdError as exc:
        raise _located(config, exc) from None
    identifier = identify.Identifier(directory, networks, leases)

    tt_path = config.path("timetable", "path")
    timetable = None
    if tt_path:
        known = frozenset(directory.usernames) if directory is not None and hasattr(directory, "usernames") else None
        timetable = window.load_timetable(tt_path, known_users=known) if known is not None \
            else window.load_timetable(tt_path)

    roles = set(directory.roles) if directory is not None else set()
    roles |= {n.role for n in networks}
    roles |= {"staff", "pupil"}
    try:
        rules = decide.parse_rules(list(config.rules),
                                   known_categories=classifier.categories | {formcheck.SCHOOL_EMAIL},
                                   known_roles=frozenset(roles))
    except FilterdError as exc:
        raise _located(config, exc) from None
    ignore = frozenset(config.get("proxy", "ignore_categories"))
    unknown = ignore - classifier.categories
    if unknown:
        raise FilterdError(f"unknown categories {sorted(unknown)}", file=config.file,
                           line=config.line_of("proxy.ignore_categories"),
                           field="proxy.ignore_categories")
    domains = config.get("identity", "school_email_domains") or (
        formcheck.domains_from_directory(u.email for u in directory) if directory is not None else [])
    return Pipeline(identifier, classifier, timetable, decide.Policy(rules), ignore,
                    school_email=formcheck.pattern(domains),
                    social_categories=frozenset(config.get("report", "social_categories")))


def _located(config: Config, exc: FilterdError) -> FilterdError:
    """Add the config file and line to an error a stage raised about a config field."""
    if exc.file is None and exc.field:
        return FilterdError(exc.message, file=config.file, line=config.line_of(exc.field),
                            field=exc.field)
    return exc


def data_dir_ready(path: Path) -> Path:
    """Create the data folder (mode 0700: it holds who browsed what)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
