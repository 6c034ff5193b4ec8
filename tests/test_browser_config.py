"""The browser kind without a browser: Playwright is optional, flows using the kind say so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from monitor.config import load
from probes.errors import ConfigError

BROWSER_FLOW = """\
flows:
  - name: ui
    steps:
      - name: order
        kind: browser
        actions: [{goto: "http://127.0.0.1:1/order"}]
"""
HTTP_FLOW = """\
flows:
  - name: api
    steps:
      - {name: get, kind: http, url: "http://127.0.0.1:1/"}
"""


def test_the_monitor_imports_no_playwright_until_a_browser_step_runs() -> None:
    code = (
        "import sys, monitor.engine, monitor.cli, probes; "
        "assert 'playwright' not in sys.modules, 'playwright imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_without_playwright_only_flows_using_the_kind_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "playwright", None)  # as if not installed
    api, ui = tmp_path / "api.yaml", tmp_path / "ui.yaml"
    api.write_text(HTTP_FLOW)
    ui.write_text(BROWSER_FLOW)
    assert [f.name for f in load([api]).flows] == ["api"]
    with pytest.raises(ConfigError) as refused:
        load([ui])
    assert refused.value.problems == [
        f"{ui}:4: flow 'ui' step 'order': the browser kind needs Playwright: "
        "pip install 'hopwatch[browser]'"
    ]
