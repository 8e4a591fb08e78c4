"""Rewrite the comments of every notebook's parameters cell from configs/default.yaml, verbatim.

    .venv/bin/python scripts/sync_parameters.py

Values are left alone (tests/test_experiment.py checks that they equal the preset's); each key's comment,
each mapping entry's comment and the indented comment lines that continue them are copied from the
preset, character for character.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
YAML_KEY = re.compile(r"^([A-Z][A-Z0-9_]*):(.*)$")
YAML_ENTRY = re.compile(r"^\s+([A-Za-z0-9_]+):(.*)$")
CELL_KEY = re.compile(r"^([A-Z][A-Z0-9_]*) = (.*)$")
CELL_ENTRY = re.compile(r"^ {4}'([A-Za-z0-9_]+)':(?: (.*))?$")  # a mapping's entry (one level deep)
COMMENT = re.compile(r"\s+#\s?(.*)$")


def preset_comments(text: str) -> dict[str, str]:
    """``KEY`` and ``KEY.entry`` -> comment (continuation lines joined with newlines)."""
    found, top, last = {}, None, None
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            if line.startswith(" ") and last is not None:
                found[last] += "\n" + line.strip()[1:].strip()
            continue
        match = YAML_KEY.match(line)
        if match:
            top = last = match.group(1)
        elif top and (match := YAML_ENTRY.match(line)):
            last = f"{top}.{match.group(1)}"
        else:
            continue
        comment = COMMENT.search(match.group(2))
        found[last] = comment.group(1).rstrip() if comment else ""
    return found


def rewrite(source: str, comments: dict[str, str]) -> str:
    lines, top = [], None
    for line in source.splitlines():
        if line.startswith(" ") and line.lstrip().startswith("#"):
            continue  # continuations are written again from the preset
        key = None
        if match := CELL_KEY.match(line):
            top = key = match.group(1)
        elif top and (match := CELL_ENTRY.match(line)):
            key = f"{top}.{match.group(1)}"
        if key not in comments:
            lines.append(line)
            continue
        first, *rest = comments[key].split("\n")
        code = line[: m.start()] if (m := COMMENT.search(line)) else line
        lines.append(f"{code}  # {first}" if first else code)
        indent = re.match(r"\s*", line).group(0) + "    "
        lines += [f"{indent}# {text}" for text in rest]
    return "\n".join(lines)


def main() -> None:
    comments = preset_comments((ROOT / "configs" / "default.yaml").read_text())
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(str(path), as_version=4)
        cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
        source = rewrite(cell.source, comments)
        if source != cell.source:
            cell.source = source
            nbformat.write(notebook, str(path))
            print(f"rewrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
