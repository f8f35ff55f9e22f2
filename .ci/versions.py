"""Which releases of a dependency CI tests, computed from setup.cfg and the package registry when CI runs.

    python .ci/versions.py minors transformers   # latest patch of every minor in the declared range, oldest first
    python .ci/versions.py lower timm            # the oldest release the declared lower bound admits (1.0.23)
    python .ci/versions.py installed transformers

Nothing here is written down ahead of time: a release that appears after the last commit is in the next CI run.
"""

import configparser
import re
import subprocess
import sys
from importlib.metadata import version as installed_version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"


def requirement(package: str) -> Requirement:
    """setup.cfg's `install_requires` entry for `package`."""
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    for line in parser["options"]["install_requires"].splitlines():
        line = line.split("#", 1)[0].strip()
        if line and Requirement(line).name.lower() == package.lower():
            return Requirement(line)
    raise SystemExit(f"setup.cfg does not require {package}")


def lower_bound(package: str) -> Version:
    bounds = [Version(spec.version) for spec in requirement(package).specifier if spec.operator in (">=", "==")]
    if not bounds:
        raise SystemExit(f"setup.cfg gives {package} no lower bound (>=); CI tests the declared range from it")
    return max(bounds)


def lowest_release(package: str) -> Version:
    """The oldest release on the registry that setup.cfg allows: what the declared lower bound means in practice."""
    spec = requirement(package).specifier
    allowed = [v for v in registry_versions(package) if v in spec and v >= lower_bound(package)]
    if not allowed:
        raise SystemExit(f"no release of {package} on the registry satisfies {spec}")
    return min(allowed)


def registry_versions(package: str) -> list[Version]:
    """Every final release the registry offers, as pip itself sees them (same index, same constraints)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", package, "--disable-pip-version-check"],
        capture_output=True, text=True, check=True,
    ).stdout
    match = re.search(r"Available versions:\s*(.+)", out)
    if not match:
        raise SystemExit(f"pip index versions {package} listed nothing:\n{out}")
    versions = [Version(text.strip()) for text in match.group(1).split(",") if text.strip()]
    return [v for v in versions if not v.is_prerelease and not v.is_devrelease]


def minors(package: str) -> list[Version]:
    """The newest patch of each minor release inside the declared range, from the lower bound up."""
    spec = requirement(package).specifier
    newest: dict[tuple[int, int], Version] = {}
    for candidate in registry_versions(package):
        if candidate in spec and candidate >= lower_bound(package):
            key = candidate.release[:2]
            newest[key] = max(newest.get(key, candidate), candidate)
    if not newest:
        raise SystemExit(f"no release of {package} on the registry satisfies {spec}")
    return [newest[key] for key in sorted(newest)]


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("minors", "lower", "installed"):
        raise SystemExit(__doc__)
    command, package = argv
    if command == "minors":
        print("\n".join(str(v) for v in minors(package)))
    elif command == "lower":
        print(lowest_release(package))
    else:
        print(Version(installed_version(package)).public)  # 2.14.1+cu130 -> 2.14.1


if __name__ == "__main__":
    main(sys.argv[1:])
