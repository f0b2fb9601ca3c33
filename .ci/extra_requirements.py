"""Print the requirements of one extra of pyproject.toml, one per line: the base dependencies, the extra's own,
and those of every ``proma[...]`` extra it names (recursively). CI installs a verl environment from them without
installing this checkout (its tests import the checkout through pytest's ``pythonpath``), so that environments
can be built side by side without two installs writing this checkout's metadata at once."""
import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]


def requirements(name: str, seen: set) -> list:
    if name not in extras:
        sys.exit(f"extra {name!r} is not in pyproject.toml (it has {sorted(extras)})")
    out = []
    for req in extras[name]:
        own = re.fullmatch(r"\s*proma\[([^\]]+)\]\s*", req)
        if own:
            for sub in own.group(1).split(","):
                if sub.strip() not in seen:
                    seen.add(sub.strip())
                    out += requirements(sub.strip(), seen)
        else:
            out.append(req)
    return out


if __name__ == "__main__":
    print("\n".join(dict.fromkeys(project["dependencies"] + requirements(sys.argv[1], {sys.argv[1]}))))
