"""Where a bench script's result goes: bench/results/<name>.json (every number) and .md (the
table a note or the README cites), and the table on stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tasks.core.common import write_json_atomic  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def publish(name: str, out: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{name}.json", out)
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
