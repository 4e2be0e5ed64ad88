"""
Solution regions: the parts of the code that students write.

    <indent># BEGIN SOLUTION <id>
    <indent># STUB: <one line of code>    optional; the release's stub (default: raise NotImplementedError)
    <indent># PROMPT: <text>              optional; shown only in the release, as a comment
    <indent># TODO <hint>                 the hint, kept in the release (all of it goes into the error message)
    <indent>...solution code...
    <indent># END SOLUTION

Ids are unique across the project ([a-z0-9_]+). Nested, unterminated or duplicate regions are errors
that name the file and line.
"""

import os
import re
from dataclasses import dataclass

BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION(?:\s+(\S+))?\s*$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
ID = re.compile(r"^[a-z0-9_]+$")


class RegionError(ValueError):
    pass


@dataclass
class Region:
    id: str
    path: str
    start: int  # 1-based line number of BEGIN
    end: int  # 1-based line number of END
    indent: str
    stub: str | None
    prompt: list  # release-only comment lines
    hint: list  # "# TODO ..." lines
    code: list  # solution lines (without markers, stub, prompt and hint)

    def message(self):
        """'TODO[id]: <the whole hint, its lines joined>'."""
        lines = [re.sub(r"^TODO:?\s*", "", h.strip().lstrip("#").strip()) for h in self.hint]
        return f"TODO[{self.id}]: {' '.join(lines) or 'write this part'}"

    def release_lines(self):
        """What replaces the region in the student release."""
        lines = [f"{self.indent}# {p}" for p in self.prompt] + self.hint
        if self.stub is not None:
            lines.append(f"{self.indent}{self.stub}")
        else:
            lines.append(f"{self.indent}raise NotImplementedError({self.message()!r})")
        return lines


def parse(text, path="<text>"):
    """Regions of one file's text, in order."""
    regions, current = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        begin = BEGIN.match(line)
        if begin:
            if current is not None:
                raise RegionError(f"{path}:{number}: BEGIN SOLUTION inside region '{current.id}' "
                                  f"(opened at line {current.start}); regions cannot nest")
            rid = begin.group(2)
            if rid is None or not ID.match(rid):
                raise RegionError(f"{path}:{number}: BEGIN SOLUTION needs an id of [a-z0-9_], got {rid!r}")
            current = Region(rid, path, number, 0, begin.group(1), None, [], [], [])
        elif END.match(line):
            if current is None:
                raise RegionError(f"{path}:{number}: END SOLUTION without a BEGIN SOLUTION")
            current.end = number
            regions.append(current)
            current = None
        elif current is not None:
            stripped = line.strip()
            if stripped.startswith("# STUB:"):
                current.stub = stripped[len("# STUB:"):].strip()
            elif stripped.startswith("# PROMPT:"):
                current.prompt.append(stripped[len("# PROMPT:"):].strip())
            elif stripped.startswith("# TODO") and not current.code:
                current.hint.append(line)
            else:
                current.code.append(line)
        elif line.lstrip().startswith("#") and ("BEGIN SOLUTION" in line or "END SOLUTION" in line):
            raise RegionError(f"{path}:{number}: malformed marker; write '# BEGIN SOLUTION <id>' or '# END SOLUTION' "
                              f"alone on the line")
    if current is not None:
        raise RegionError(f"{path}:{current.start}: region '{current.id}' is never closed with END SOLUTION")
    return regions


def parse_files(paths, root="."):
    """Regions of several files (paths relative to root, as the errors name them); ids must be unique
    across all of them."""
    seen, regions = {}, []
    for path in paths:
        with open(os.path.join(root, path), encoding="utf-8") as f:
            for region in parse(f.read(), path):
                if region.id in seen:
                    other = seen[region.id]
                    raise RegionError(f"{path}:{region.start}: duplicate region id '{region.id}' "
                                      f"(also at {other.path}:{other.start})")
                seen[region.id] = region
                regions.append(region)
    return regions


def strip(text, path="<text>", only=None):
    """The release version of a file's text: every region (or only the ids in `only`) replaced by its stub."""
    lines = text.splitlines()
    out, position = [], 0
    for region in parse(text, path):
        if only is not None and region.id not in only:
            continue
        out += lines[position:region.start - 1] + region.release_lines()
        position = region.end
    out += lines[position:]
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")
