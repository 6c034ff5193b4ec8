"""Run history in SQL (SQLite by default, PostgreSQL by URL): runs, hops, incidents, samples."""

from monitor.store.connect import normalize_url
from monitor.store.incidents import Incident, IncidentBook
from monitor.store.queries import BadCursor
from monitor.store.rows import EXCERPT_LIMIT
from monitor.store.stats import StoreStats
from monitor.store.store import Store
from monitor.store.views import (
    ArtifactInfo,
    IncidentPage,
    IncidentView,
    LinkPoint,
    RunDetail,
    RunPage,
    RunSummary,
    StepSamples,
    StepView,
)

__all__ = [
    "EXCERPT_LIMIT",
    "ArtifactInfo",
    "BadCursor",
    "Incident",
    "IncidentBook",
    "IncidentPage",
    "IncidentView",
    "LinkPoint",
    "RunDetail",
    "RunPage",
    "RunSummary",
    "StepSamples",
    "StepView",
    "Store",
    "StoreStats",
    "normalize_url",
]
