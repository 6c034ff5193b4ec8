"""What loading a config imports: validating flow files must not load a Kafka client library."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FLOW = """\
kafka:
  clusters:
    main: {bootstrap_servers: "127.0.0.1:9", client_id: import-check}
flows:
  - name: kafka_chain
    steps:
      - {name: send, kind: kafka_produce, cluster: main, topic: orders, value: {a: 1}}
      - {name: see, kind: kafka_consume, cluster: main, topic: orders, within: 1s}
"""

# Each runs in a fresh interpreter (this one has long imported aiokafka), loads the flow file
# at sys.argv[1] the way its entry point does, and prints the Kafka client modules it loaded.
LOAD_CONFIG = """
    import sys
    from monitor.config import load

    config = load([sys.argv[1]])
    assert [s.name for s in config.flows[0].steps] == ["send", "see"]
"""
VALIDATE = """
    import sys
    from monitor.cli import app

    try:
        app(["validate", sys.argv[1]])
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
"""
REPORT = """
    print(sorted(m for m in sys.modules if m.split(".")[0] == "aiokafka")[:3])
"""


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(LOAD_CONFIG, id="monitor.config.load"),
        pytest.param(VALIDATE, id="hopwatch validate"),
    ],
)
def test_loading_a_config_imports_no_kafka_client(script: str, tmp_path: Path) -> None:
    flow = tmp_path / "kafka.yaml"
    flow.write_text(FLOW, encoding="utf-8")
    code = textwrap.dedent(script) + textwrap.dedent(REPORT)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(flow)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
