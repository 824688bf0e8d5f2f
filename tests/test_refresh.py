"""filterd.refresh against a real http.server on 127.0.0.1 and real files: good, bad, unchanged."""

from __future__ import annotations

import functools
import io
import os
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from filterd.errors import FilterdError
from filterd.refresh import RefreshError, extract_category, refresh_list


def domains_only(path: Path) -> None:
    """A stand-in for the caller's list loader: every line must be a domain-looking word."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise FilterdError("empty list", file=path)
    for n, line in enumerate(lines, 1):
        if not line or " " in line or "<" in line:
            raise FilterdError("not a domain", file=path, line=n)


class Handler(SimpleHTTPRequestHandler):
    requests: list[dict[str, str]] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        Handler.requests.append(dict(self.headers))
        if self.path == "/broken":
            self.send_error(500, "mirror broken")
            return
        super().do_GET()

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def web(tmp_path):
    """A real HTTP server serving tmp_path/www; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    Handler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".new", ".old")))


def test_http_download_installs_then_304_then_change(web, tmp_path):
    root, base = web
    (root / "terrorism").write_text("bad.example\nworse.example\n")
    dest = tmp_path / "lists" / "terrorism"
    assert refresh_list(f"{base}/terrorism", dest, domains_only) is True
    assert dest.read_text() == "bad.example\nworse.example\n"
    # Second time: the server answers 304 to If-Modified-Since; nothing changes.
    assert refresh_list(f"{base}/terrorism", dest, domains_only) is False
    assert "If-Modified-Since" in Handler.requests[-1]
    # New content (and a newer mtime): installed.
    (root / "terrorism").write_text("bad.example\nworse.example\nnew.example\n")
    os.utime(root / "terrorism", (2_000_000_000, 2_000_000_000))
    assert refresh_list(f"{base}/terrorism", dest, domains_only) is True
    assert "new.example" in dest.read_text()
    assert leftovers(dest.parent) == []


def test_bad_download_never_replaces_a_good_list(web, tmp_path):
    root, base = web
    dest = tmp_path / "terrorism"
    dest.write_text("good.example\n")
    (root / "list").write_text("<html>captive portal login</html>\n")
    with pytest.raises(RefreshError, match="rejected, keeping the old list: .*not a domain"):
        refresh_list(f"{base}/list", dest, domains_only)
    with pytest.raises(RefreshError, match="HTTP 500"):
        refresh_list(f"{base}/broken", dest, domains_only)
    with pytest.raises(RefreshError, match="HTTP 404"):
        refresh_list(f"{base}/missing", dest, domains_only)
    (root / "big").write_text("a.example\n" * 1000)
    with pytest.raises(RefreshError, match="larger than 100 bytes"):
        refresh_list(f"{base}/big", dest, domains_only, max_bytes=100)
    assert dest.read_text() == "good.example\n"
    assert leftovers(tmp_path) == []


def test_server_down_keeps_the_old_list(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "terrorism"
    dest.write_text("good.example\n")
    with pytest.raises(RefreshError, match="download failed"):
        refresh_list(f"http://127.0.0.1:{port}/x", dest, domains_only, timeout=5)
    assert dest.read_text() == "good.example\n"


def test_file_source_changed_and_unchanged(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("a.example\n")
    dest = tmp_path / "lists" / "a"
    assert refresh_list(str(src), dest, domains_only) is True
    calls: list[Path] = []
    assert refresh_list(str(src), dest, lambda p: calls.append(p)) is False
    assert calls == []  # same sha256: not even validated again
    src.write_text("a.example\nb.example\n")
    assert refresh_list(src.as_uri(), dest, domains_only) is True
    assert dest.read_text() == "a.example\nb.example\n"
    with pytest.raises(RefreshError, match="cannot read"):
        refresh_list(str(tmp_path / "nope"), dest, domains_only)


def make_tarball(path: Path, members: dict[str, bytes], *, symlink: tuple[str, str] | None = None) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink[0])
            info.type = tarfile.SYMTYPE
            info.linkname = symlink[1]
            tar.addfile(info)


def test_squidguard_tarball_one_category_safely(tmp_path):
    tarball = tmp_path / "blacklists.tar.gz"
    make_tarball(tarball, {
        "../../agressif/domains": b"evil.example\n",  # traversal: skipped, never written there
        "/abs/agressif/urls": b"evil.example/x\n",
        "blacklists/agressif/domains": b"bad.example\n",
        "blacklists/agressif/urls": b"bad.example/path\n",
        "blacklists/adult/domains": b"adult.example\n",
        "blacklists/agressif/expressions": b"(.*)\n",
    }, symlink=("blacklists/agressif/usage", "/etc/passwd"))
    dest = tmp_path / "lists" / "agressif"
    seen: list[list[str]] = []
    assert refresh_list(str(tarball), dest, lambda p: seen.append(sorted(os.listdir(p))),
                        category="agressif") is True
    assert seen == [["domains", "urls"]]
    assert sorted(os.listdir(dest)) == ["domains", "urls"]
    assert (dest / "domains").read_text() == "bad.example\n"
    assert (dest / "urls").read_text() == "bad.example/path\n"
    assert not (tmp_path.parent / "agressif").exists()
    # unchanged: False; a bad candidate keeps the old folder
    assert refresh_list(str(tarball), dest, lambda p: None, category="agressif") is False
    make_tarball(tarball, {"blacklists/agressif/domains": b"<html>\n"})

    def reject(p: Path) -> None:
        domains_only(p / "domains")

    with pytest.raises(RefreshError, match="rejected"):
        refresh_list(str(tarball), dest, reject, category="agressif")
    assert (dest / "domains").read_text() == "bad.example\n"
    assert leftovers(dest.parent) == []


def test_extract_category_errors(tmp_path):
    tarball = tmp_path / "t.tar.gz"
    make_tarball(tarball, {"blacklists/adult/domains": b"x.example\n"})
    (tmp_path / "out").mkdir()
    with pytest.raises(RefreshError, match="no category 'agressif'"):
        extract_category(tarball, "agressif", tmp_path / "out")
    with pytest.raises(RefreshError, match="bad category name"):
        extract_category(tarball, "../x", tmp_path / "out")
    (tmp_path / "notgz").write_bytes(b"hello")
    with pytest.raises(RefreshError, match="not a readable tarball"):
        extract_category(tmp_path / "notgz", "adult", tmp_path / "out")
