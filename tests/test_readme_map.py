"""The README's map from the paper's equations to the code names line ranges; this keeps them true as the code moves.

A row of the map names a symbol (`rewards.f_len`, `train_grpo.main`) and the lines it spans
(`nanosrpo/rewards.py:261-268`): the symbol must be a top-level def, class or assignment of that file, starting and
ending on exactly those lines.
"""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROW = re.compile(r"`(\w+)\.(\w+)`[^|]*\|\s*`?([\w/]+\.py):(\d+)-(\d+)`?")


def _span(path: Path, name: str) -> tuple[int, int] | None:
    for node in ast.parse(path.read_text()).body:
        names = (
            [node.name]
            if hasattr(node, "name")
            else [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        )
        if name in names:
            return node.lineno, node.end_lineno
    return None


def test_equation_map_line_ranges_match_the_code():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Reading the code", 1)[1].split("\n## ", 1)[0]
    rows = ROW.findall(section)
    assert len(rows) >= 10, "the map lost its rows"
    for module, name, path, start, end in rows:
        assert Path(path).stem == module, f"{module}.{name} is not in {path}"
        span = _span(REPO / path, name)
        assert span is not None, f"{path} has no top-level {name}"
        assert span == (int(start), int(end)), (
            f"README says {path}:{start}-{end} for {module}.{name}; it is {span[0]}-{span[1]}"
        )
