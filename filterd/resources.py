"""Where the shipped files live: the repo checkout, or ``<prefix>/share/filterd`` for a wheel.

The embedded default config, the starter blocklists and the report templates are top-level
folders of the project (``config/``, ``blocklists/``, ``reports/``) so that ICT can read them;
this module is the one place that knows how to find them from the installed package.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """The shipped folder ``name`` (``config``, ``blocklists`` or ``reports``)."""
    candidates = [
        PACKAGE_DIR.parent / name,  # a checkout, or an editable install
        Path(sys.prefix) / "share" / "filterd" / name,  # a wheel's data_files
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"filterd's shipped folder {name!r} is missing (looked in "
                            + ", ".join(str(c) for c in candidates) + ")")


def templates() -> Path:
    """Jinja2 templates that are part of the package (block page, alert mails)."""
    return PACKAGE_DIR / "templates"
