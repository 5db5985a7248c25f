"""Named sets of settings (presets/<name>.yaml: overrides on params.yaml), written into params.yaml itself.

A preset is applied by rewriting the values in params.yaml, not by a second file the stages read: DVC tracks
params.yaml, so `dvc repro` sees exactly what changed and re-runs what depends on it, and the file stays the
one place that says how the pipeline runs. Only the value of each overridden `section: key` line changes;
its comment and every other line stay as they were. The result is parsed again and must equal params.yaml
merged with the preset, or nothing is written.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from tasks.config import ParamsError, parse, read_params_text

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"


def names(folder: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load(name: str, folder: Path = PRESETS_DIR) -> dict[str, dict[str, Any]]:
    """The overrides of preset `name`: {section: {key: value}}."""
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"no preset {name!r} (presets: {', '.join(names(folder)) or 'none'}; in {folder})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ParamsError(f"{path}: a preset maps sections to {{key: value}} overrides")
    return data


def _flow(value: Any) -> str:
    """`value` as one line of YAML (flow style): what goes after `key: `."""
    return str(yaml.safe_dump(value, default_flow_style=True, width=10**6)).removesuffix("\n...\n").strip()


def apply(text: str, overrides: dict[str, dict[str, Any]], where: str = "params.yaml") -> str:
    """params.yaml text `text` with `overrides` written in place of the current values."""
    lines = text.splitlines(keepends=True)
    for section, values in overrides.items():
        start = next((i for i, line in enumerate(lines) if re.match(rf"{re.escape(section)}:\s*(#.*)?$", line)),
                     None)
        if start is None:
            raise ParamsError(f"{where}: no section {section!r} to apply the preset's {section}.* to")
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"\S", lines[i])), len(lines))
        for key, value in values.items():
            pattern = re.compile(rf"^(  {re.escape(key)}:)(\s*)([^#\n]*?)(\s*)(#.*)?$")
            found = [i for i in range(start + 1, end) if pattern.match(lines[i].rstrip("\n"))]
            if len(found) != 1:
                raise ParamsError(f"{where}: no single line `  {key}:` in section {section} for the preset's "
                                  f"{section}.{key}")
            i = found[0]
            match = pattern.match(lines[i].rstrip("\n"))
            assert match is not None
            head, gap, old, pad, comment = match.groups()
            new = f"{head}{gap or ' '}{_flow(value)}"
            if comment:  # keep the comment where it was, or one space after a longer value
                column = len(head) + len(gap) + len(old) + len(pad)
                new = new.ljust(column - 1) + " " + comment if len(new) < column else f"{new} {comment}"
            lines[i] = new + "\n"
    return "".join(lines)


def write(params_file: Path, name: str, folder: Path = PRESETS_DIR) -> str:
    """Apply preset `name` to `params_file`; returns the unified diff ("" when nothing changed)."""
    from tasks.config import Params

    overrides = load(name, folder)
    before = read_params_text(params_file)  # checked (size, UTF-8, depth, aliases) before YAML builds anything
    after = apply(before, overrides, str(params_file))
    wanted = yaml.safe_load(before)
    for section, values in overrides.items():
        wanted[section] = {**wanted.get(section, {}), **values}
    if yaml.safe_load(after) != wanted:  # the line edits did not say what the preset says
        raise ParamsError(f"{params_file}: applying preset {name!r} line by line did not give its values; "
                          f"edit params.yaml by hand")
    parse(Params, yaml.safe_load(after), "")  # refuses a preset that makes params.yaml invalid, by key
    params_file.write_text(after)
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        str(params_file), f"{params_file} (preset {name})"))
