"""One error type for bad input, so every command can print it as one line and exit 1."""

from __future__ import annotations

from pathlib import Path


class FilterdError(Exception):
    """Bad input from a person: a config, list, timetable, CSV file or argument.

    It names where the problem is (file, line, field) so ICT can fix it without a traceback.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message}"


def read_text(path: Path, what: str, *, bom: bool = False) -> str:
    """A person's text file (users.csv, a timetable, an export), or one FilterdError naming it.

    ``bom`` accepts a UTF-8 byte-order mark, which spreadsheet exports put at the start.
    """
    try:
        return path.read_text(encoding="utf-8-sig" if bom else "utf-8")
    except FileNotFoundError:
        raise FilterdError(f"{what} not found", file=path) from None
    except OSError as e:
        raise FilterdError(f"cannot read {what}: {e.strerror or e}", file=path) from None
    except UnicodeDecodeError as e:
        raise FilterdError(f"{what} is not UTF-8 text: {e.reason}", file=path) from None


def parse_toml(text: str, path: Path) -> dict:
    """TOML text as tables, or one FilterdError with the line tomllib names."""
    import re
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = re.search(r"line (\d+)", str(e))
        raise FilterdError(f"not valid TOML: {e}", file=path,
                           line=int(match.group(1)) if match else None) from None
