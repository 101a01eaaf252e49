"""Fails unless every installed distribution is pinned in constraints.txt at that version.

Run in the image after the installs (``python check_pins.py constraints.txt``): it proves
the image holds exactly the versions the README installs, nothing resolved unpinned.
pip/setuptools/wheel (installers, not in a pip freeze) and the project itself are exempt.
"""
import re
import sys
from importlib import metadata

EXEMPT = {"pip", "setuptools", "wheel", "mrcnn-batch"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict:
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            if not sep:
                raise SystemExit(f"{path}: not an exact pin: {line!r}")
            pins[canonical(name.split("[")[0])] = version.strip()
    return pins


def mismatches(pins: dict) -> list:
    bad = []
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"] or "")
        if not name or name in EXEMPT:
            continue
        want = pins.get(name)
        if want is None:
            bad.append(f"{name}=={dist.version} is installed but not pinned")
        elif want != dist.version:
            bad.append(f"{name}=={dist.version} is installed but constraints pin {want}")
    return sorted(bad)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: check_pins.py CONSTRAINTS_FILE", file=sys.stderr)
        return 2
    bad = mismatches(read_pins(argv[0]))
    for line in bad:
        print(f"check_pins: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
