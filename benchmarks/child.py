"""Entry point of a benchmark's measured process: `python -m benchmarks.child module.function JSON`.

The parent pins this process to one core before it starts; here the event loop (uvloop unless
the arguments say otherwise) runs `benchmarks.<module>.<function>(args)` and the result is
printed as one JSON line, so CPU time and memory are this process's alone.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
from typing import Any

from benchmarks.common import RESULT_MARK


def main() -> None:
    target, raw = sys.argv[1], sys.argv[2]
    args: dict[str, Any] = json.loads(raw)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    module_name, func_name = target.rsplit(".", 1)
    func = getattr(importlib.import_module(f"benchmarks.{module_name}"), func_name)
    if args.get("uvloop", True):
        import uvloop

        from monitor.event_loop import new_event_loop  # the loop `hopwatch run` runs on

        result = uvloop.run(func(args), loop_factory=new_event_loop)
    else:
        result = asyncio.run(func(args))
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
