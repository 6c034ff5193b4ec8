"""Maintenance windows: runs go on and are recorded, marked, but open no incident and page nobody.

What is where:
- `windows`: `Window` (one concrete window), `MaintenanceSpec` (a flow file's `maintenance:`
  entry, fixed or on a cron schedule) and `parse_time` (RFC 3339 or unix seconds).
- `book`: `MaintenanceBook`, the windows that hold around now, runtime ones kept in the store
  and polled, and the `hopwatch_maintenance` gauge.
- `command`: `hopwatch maintenance add|list|end`, a client of the admin API.
"""

from monitor.maintenance.book import DeclaredWindow, MaintenanceBook, UnknownWindow, WindowStore
from monitor.maintenance.windows import MaintenanceSpec, Window, parse_time, rfc3339

__all__ = [
    "DeclaredWindow",
    "MaintenanceBook",
    "MaintenanceSpec",
    "UnknownWindow",
    "Window",
    "WindowStore",
    "parse_time",
    "rfc3339",
]
