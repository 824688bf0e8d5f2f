"""The store's schema, as numbered migrations, so a school's database can be upgraded in place.

Each migration is a function of a ``sqlite_utils.Database`` that moves the schema from version
``n - 1`` to ``n``. ``migrate`` applies the missing ones in one ``BEGIN IMMEDIATE`` transaction
(the daemon and the sensor may start at the same moment; only one of them applies them) and
records each in the ``migrations`` table. It is idempotent on an up-to-date database, and it
refuses a database written by a newer filterd: downgrading code must never reinterpret columns
it does not know.

Keys that may be NULL (an unknown user, no rule, a lease without a MAC) are part of the
aggregation keys, and SQLite treats NULLs as distinct in a PRIMARY KEY, so an upsert would never
match them. The natural keys are therefore unique *expression* indexes over ``ifnull(col, '')``:
the columns keep plain NULLs for readers, and ``ON CONFLICT`` still finds the row.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from filterd.errors import FilterdError

#: The conflict target of the usage upsert; must match the ``usage_key`` index exactly.
USAGE_KEY = ("minute, ifnull(user, ''), ifnull(ip, ''), host, window, action, ifnull(rule, '')")
#: The conflict target of the lease upsert; must match the ``leases_key`` index exactly.
LEASE_KEY = "ifnull(mac, ''), ip"


class SchemaTooNewError(FilterdError):
    """The database was written by a newer filterd than this one."""


def _v1_initial(db: sqlite_utils.Database) -> None:
    """events, usage, alerts, leases and imports (issue 4, 6, 7, 8)."""
    db.create_table(
        "events",
        {
            "id": int, "ref": str, "time": str, "ts": float, "kind": str,
            "user": str, "role": str, "ip": str, "device": str, "host": str, "url": str,
            "categories": str, "window": str, "action": str, "rule": str, "alert": int,
            "method": str, "detail": str, "source": str,
        },
        pk="id",
        not_null=["ref", "time", "ts", "kind", "host", "categories", "window", "action",
                  "alert", "source"],
    )
    db["events"].create_index(["ref"], index_name="events_ref", unique=True)
    db["events"].create_index(["ts"], index_name="events_ts")
    db["events"].create_index(["user", "ts"], index_name="events_user_ts")

    db.create_table(
        "usage",
        {
            "minute": int, "user": str, "role": str, "ip": str, "device": str, "host": str,
            "categories": str, "window": str, "action": str, "rule": str,
            "requests": int, "blocked": int, "source": str,
        },
        not_null=["minute", "host", "categories", "window", "action", "requests", "blocked",
                  "source"],
        defaults={"requests": 0, "blocked": 0},
    )
    db.execute(f"CREATE UNIQUE INDEX usage_key ON usage({USAGE_KEY})")
    db["usage"].create_index(["user", "minute"], index_name="usage_user_minute")

    db.create_table(
        "alerts",
        {
            "id": int, "event_ref": str, "created": float, "state": str, "attempts": int,
            "next_attempt": float, "last_error": str, "message_id": str, "sent": float,
            "group_ref": str,
        },
        pk="id",
        foreign_keys=[("event_ref", "events", "ref")],
        not_null=["event_ref", "created", "state", "attempts", "next_attempt"],
        defaults={"state": "pending", "attempts": 0},
    )
    db["alerts"].create_index(["event_ref"], index_name="alerts_event_ref", unique=True)
    db["alerts"].create_index(["state", "next_attempt"], index_name="alerts_state_next")

    db.create_table(
        "leases",
        {"mac": str, "ip": str, "hostname": str, "user": str, "start": float,
         "expires": float, "seen": float},
        not_null=["ip", "seen"],
    )
    db.execute(f"CREATE UNIQUE INDEX leases_key ON leases({LEASE_KEY})")
    db["leases"].create_index(["ip"], index_name="leases_ip")

    db.create_table(
        "imports",
        {"source": str, "path": str, "offset": int, "lines": int, "updated": float},
        pk="source",
        not_null=["offset"],
        defaults={"offset": 0, "lines": 0},
    )


#: Version n is MIGRATIONS[n - 1]. Append only; never edit a released migration.
MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1_initial,)
#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)


def current_version(db: sqlite_utils.Database) -> int:
    """The highest applied migration, 0 for a new file."""
    if not db["migrations"].exists():
        return 0
    row = db.execute("SELECT max(version) FROM migrations").fetchone()
    return int(row[0] or 0)


def _check_not_newer(version: int, path: Path) -> None:
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"the database is at schema version {version}, but this filterd only knows up to "
            f"version {SCHEMA_VERSION}; upgrade filterd (or restore a backup made by this "
            f"version) instead of opening it with older code",
            file=path,
        )


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the database on ``conn`` (autocommit mode) up to SCHEMA_VERSION; return it.

    Raises SchemaTooNewError for a database from a newer filterd, without changing it.
    """
    db = sqlite_utils.Database(conn, execute_plugins=False)
    _check_not_newer(current_version(db), path)
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not db["migrations"].exists():
            db.create_table("migrations", {"version": int, "name": str, "applied": str},
                            pk="version")
        version = current_version(db)  # again, under the write lock
        _check_not_newer(version, path)
        for number in range(version + 1, SCHEMA_VERSION + 1):
            step = MIGRATIONS[number - 1]
            step(db)
            db["migrations"].insert({
                "version": number,
                "name": step.__name__.lstrip("_"),
                "applied": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION
