"""``filterd run``: mitmproxy in-process with the filterd addon, the store and the scheduler.

The daemon owns the lifecycle: load everything before listening (a bad config never starts a
half-working filter), swap in a new Pipeline on SIGHUP or when a watched file changes
(keeping the last good one when the new one is bad), and on SIGTERM stop listening, then
flush the store so that nothing queued is lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

from mitmproxy import log as mitmproxy_log
from mitmproxy import options
from mitmproxy.tools.dump import DumpMaster

from filterd import addon as addon_mod
from filterd import blockpage, config as config_mod, identify, pipeline as pipeline_mod
from filterd.errors import FilterdError
from filterd.record import Store

log = logging.getLogger("filterd.daemon")


def setup_logging(level: str = "INFO") -> None:
    """One line per record on stderr; under systemd journald adds the time, elsewhere we do."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(stream=sys.stderr, level=level, format=fmt, force=True)
    for noisy in ("mitmproxy", "apscheduler", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def mitmproxy_options(config: config_mod.Config) -> dict[str, object]:
    """Translate ``[proxy]`` into mitmproxy's options (its own names, its own validation)."""
    proxy = config.sections["proxy"]
    mode = proxy["mode"]
    opts: dict[str, object] = dict(
        listen_host=proxy["listen_host"],
        listen_port=proxy["listen_port"],
        mode=[mode] if isinstance(mode, str) else list(mode),
        # lazy: a blocked request never opens an upstream connection (nor needs DNS for it).
        connection_strategy="lazy",
    )
    if proxy["auth"]:
        auth = proxy["auth"]
        if auth.startswith("@"):
            auth = "@" + str(config_mod.resolve(config.file.parent, auth[1:]))
        opts["proxyauth"] = auth
    if proxy["upstream_ca"]:
        opts["ssl_verify_upstream_trusted_ca"] = str(config.path("proxy", "upstream_ca"))
    return opts


def confdir(config: config_mod.Config) -> str:
    """mitmproxy's folder, holding its CA: ``[proxy] confdir`` or ``<data_dir>/mitmproxy``."""
    return str(config.path("proxy", "confdir") or (config.data_dir / "mitmproxy"))


def settings(config: config_mod.Config, tz: ZoneInfo) -> addon_mod.Settings:
    school = config.sections["school"]
    branding = blockpage.Branding.from_files(school["name"], school["ict_contact"],
                                             config.path("school", "logo"), tz)
    try:
        ignore = addon_mod.canonical_domains(config.get("proxy", "ignore_hosts"))
    except ValueError as exc:
        raise FilterdError(str(exc), file=config.file, line=config.line_of("proxy.ignore_hosts"),
                           field="proxy.ignore_hosts") from None
    return addon_mod.Settings(branding=branding, on_store_failure=config.get("proxy", "on_store_failure"),
                              ignore_hosts=ignore)


def watched_files(config: config_mod.Config) -> list[Path]:
    """Files whose change triggers a reload: the config, lists, users, timetable."""
    files = [config.file]
    for l in config.lists:
        files += [l.path / n for n in ("domains", "urls")] if l.path.is_dir() else [l.path]
    for section, key in (("identity", "users"), ("timetable", "path")):
        p = config.path(section, key)
        if p:
            files.append(p)
    return files


def snapshot(files: list[Path]) -> dict[Path, tuple[int, int]]:
    result = {}
    for f in files:
        try:
            st = f.stat()
            result[f] = (st.st_mtime_ns, st.st_size)
        except OSError:
            result[f] = (0, 0)
    return result


class Daemon:
    """Holds the live state; ``pipeline`` and ``settings`` are swapped whole on reload."""

    def __init__(self, config_path: str | Path | None) -> None:
        self.config_path = config_path
        self.config = config_mod.load(config_path)
        pipeline_mod.data_dir_ready(self.config.data_dir)
        self.leases = identify.LeaseTable()
        self.pipeline = pipeline_mod.build(self.config, leases=self.leases)
        self.tz = self.pipeline.timetable.tz if self.pipeline.timetable else ZoneInfo("Europe/London")
        storage = self.config.sections["storage"]
        self.store = Store(self.config.data_path("storage", "path"), batch_size=storage["batch_size"],
                           flush_seconds=storage["flush_seconds"],
                           record_allowed=storage["record_allowed"], tz=self.tz)
        self.addon = addon_mod.FilterdAddon(self.pipeline, self.store, settings(self.config, self.tz))
        self.master: DumpMaster | None = None
        self.scheduler = None
        self._watch = snapshot(watched_files(self.config))
        self._reloading = asyncio.Lock()

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.store.open()
        self._refresh_leases()
        self.master = DumpMaster(options.Options(confdir=confdir(self.config)), with_termlog=False,
                                 with_dumper=False)
        self.master.addons.add(self.addon)
        try:
            self.master.options.update(**mitmproxy_options(self.config))
        except Exception as exc:  # mitmproxy's OptionsError: a bad mode spec, auth file, ...
            raise FilterdError(str(exc), file=self.config.file, field="proxy") from None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload("SIGHUP")))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        watcher = asyncio.ensure_future(self._watch_loop())
        self.master.addons.add(_Started(self))
        try:
            self.scheduler = self._start_scheduler()
            await self.master.run()
        finally:
            watcher.cancel()
            if self.scheduler is not None:
                self.scheduler.shutdown(wait=False)
            await loop.run_in_executor(None, self.store.close)
            log.info("filterd stopped; store flushed (%s)", self.store.stats())
            # mitmproxy leaves its log handler installed when start-up fails (a port in use);
            # later records from worker threads would then be sent to a closed loop.
            root = logging.getLogger()
            for handler in list(root.handlers):
                if isinstance(handler, mitmproxy_log.MitmLogHandler):
                    root.removeHandler(handler)

    def stop(self) -> None:
        log.info("stopping: no new connections, flushing the store")
        if self.master is not None:
            self.master.shutdown()

    async def reload(self, why: str) -> bool:
        """Build a whole new Pipeline off the loop; keep the old one if anything is wrong."""
        async with self._reloading:
            loop = asyncio.get_running_loop()
            try:
                config = await loop.run_in_executor(None, config_mod.load, self.config_path)
                new = await loop.run_in_executor(None, lambda: pipeline_mod.build(config, leases=self.leases))
                new_settings = await loop.run_in_executor(None, settings, config, self.tz)  # reads the logo
            except FilterdError as exc:
                log.error("reload (%s) failed, keeping the last good state: %s", why, exc)
                self._watch = snapshot(watched_files(self.config))
                return False
            except Exception:
                log.exception("reload (%s) failed, keeping the last good state", why)
                return False
            if config.sections["proxy"] != self.config.sections["proxy"]:
                log.warning("[proxy] changed: listen address, mode and auth take effect on restart")
            self.config, self.pipeline = config, new
            self.addon.pipeline, self.addon.settings = new, new_settings
            self._watch = snapshot(watched_files(config))
            log.info("reloaded (%s): %d lists, %d rules", why, len(config.lists), len(config.rules))
            return True

    async def _watch_loop(self) -> None:
        """Reload when a list, the users, the timetable or the config changes on disk."""
        interval = self.config.get("proxy", "reload_check_seconds")
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            try:
                now = await loop.run_in_executor(None, snapshot, list(self._watch))
                if now != self._watch:
                    await self.reload("a watched file changed")
                await loop.run_in_executor(None, self._refresh_leases)
            except Exception:
                log.exception("file watch failed")

    def _refresh_leases(self) -> None:
        """Take the sensor's DHCP leases from the store into the identify stage."""
        rows = self.store.leases()
        self.leases.replace(identify.Lease(mac=r["mac"], ip=r["ip"], hostname=r["hostname"],
                                           user=r["user"], start=r["start"], expires=r["expires"])
                            for r in rows)

    def _start_scheduler(self):
        """The scheduler's jobs live in filterd.scheduler; the daemon only hands them their parts."""
        from filterd import jobs

        return jobs.start(self)


class _Started:
    """A lifecycle hook: say "listening" only once mitmproxy's servers are really up."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def running(self) -> None:
        d = self.daemon
        proxy = d.config.sections["proxy"]
        log.info("filterd listening on %s:%s (%s), %d lists, database %s", proxy["listen_host"],
                 proxy["listen_port"], proxy["mode"], len(d.config.lists), d.store.path)


def run(config_path: str | Path | None) -> None:
    """Entry point of ``filterd run``."""
    setup_logging()
    daemon = Daemon(config_path)
    asyncio.run(daemon.run())
