"""The shell blocks of README.md, each with the mark that says how it is checked.

Every ```bash block in the README is preceded by one line `<!-- doc-test: KIND -->`: `setup` and
`tests` (the two commands .ci/run runs), `run` (runs as written after setup), `server` (runs against
the local server the test starts on port 8000), or `skip (why)`. Standard library only: .ci/run
reads the commands with the system's python3 before any virtualenv exists.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(
    r"^<!-- doc-test: (?P<kind>[a-z]+)(?: \((?P<why>[^)]*)\))? -->\n```bash\n(?P<code>.*?)^```",
    re.M | re.S,
)


@dataclass(frozen=True)
class Block:
    kind: str
    code: str
    why: str | None = None


def blocks(path: Path = README) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    return [Block(m["kind"], m["code"], m["why"]) for m in _BLOCK.finditer(text)]


def bash_block_count(path: Path = README) -> int:
    return len(re.findall(r"^```bash$", path.read_text(encoding="utf-8"), re.M))


def command(kind: str, path: Path = README) -> str:
    """The one block of `kind` (setup, tests)."""
    (found,) = [b.code for b in blocks(path) if b.kind == kind]
    return found


if __name__ == "__main__":
    print(command(sys.argv[1]), end="")
