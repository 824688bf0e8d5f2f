"""filterd: a web-filter monitoring daemon for a school's internet gateway.

The stages (identify, classify, window, decide, record, mail, report, sensor) are plain
modules; ``filterd.addon`` is the thin mitmproxy glue that calls them for each flow.
"""

__version__ = "0.1.0"
