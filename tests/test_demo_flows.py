"""The demo on a machine without Chromium: it runs without its browser flow and says why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rich.console import Console

from monitor.config import Config, load
from monitor.demo.runner import demo_flows_file, without_browser_flows
from probes.browser_pool import CHROMIUM_ENV


def _demo_config(tmp_path: Path) -> Config:
    path = demo_flows_file("http://127.0.0.1:1", "127.0.0.1:2", tmp_path, "sqlite:///o.db")
    return load([path])


def test_no_chromium_drops_checkout_ui_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CHROMIUM_ENV, str(tmp_path / "no-such-chromium"))
    console = Console(record=True, width=200)
    config = without_browser_flows(_demo_config(tmp_path), console)
    names = [f.name for f in config.flows]
    assert "checkout_ui" not in names and "checkout" in names
    assert "runs without checkout_ui" in console.export_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_with_chromium_every_demo_flow_stays(tmp_path: Path) -> None:
    config = _demo_config(tmp_path)
    assert without_browser_flows(config, Console(record=True)) is config
