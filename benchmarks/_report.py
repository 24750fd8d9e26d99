"""What every benchmark does with its result: print the JSON, and write it to ``--out``."""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, out: Path | None) -> None:
    """Prints ``report`` as JSON and writes it to ``out`` (its folder created) when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
