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


def blocks(text, path, begin, end, what):
    """[(begin's match, first line, last line)] of the blocks between a line matching `begin` and the next
    matching `end` (1-based line numbers). A block inside a block, an end without a begin or a begin without
    an end is a RegionError naming the file, the line and `what` the markers are."""
    found, opened = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = begin.match(line)
        if match:
            if opened is not None:
                raise RegionError(f"{path}:{number}: {what} begins inside the one opened at line {opened[1]}; "
                                  f"they cannot nest")
            opened = (match, number)
        elif end.match(line):
            if opened is None:
                raise RegionError(f"{path}:{number}: end of a {what} without a beginning")
            found.append((*opened, number))
            opened = None
    if opened is not None:
        raise RegionError(f"{path}:{opened[1]}: {what} is never closed")
    return found


def parse(text, path="<text>"):
    """Regions of one file's text, in order."""
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if (line.lstrip().startswith("#") and ("BEGIN SOLUTION" in line or "END SOLUTION" in line)
                and not BEGIN.match(line) and not END.match(line)):
            raise RegionError(f"{path}:{number}: malformed marker; write '# BEGIN SOLUTION <id>' or '# END SOLUTION' "
                              f"alone on the line")
    regions = []
    for begin, start, end in blocks(text, path, BEGIN, END, "solution region (BEGIN SOLUTION ... END SOLUTION)"):
        rid = begin.group(2)
        if rid is None or not ID.match(rid):
            raise RegionError(f"{path}:{start}: BEGIN SOLUTION needs an id of [a-z0-9_], got {rid!r}")
        region = Region(rid, path, start, end, begin.group(1), None, [], [], [])
        for line in lines[start:end - 1]:
            stripped = line.strip()
            if stripped.startswith("# STUB:"):
                region.stub = stripped[len("# STUB:"):].strip()
            elif stripped.startswith("# PROMPT:"):
                region.prompt.append(stripped[len("# PROMPT:"):].strip())
            elif stripped.startswith("# TODO") and not region.code:
                region.hint.append(line)
            else:
                region.code.append(line)
        regions.append(region)
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
