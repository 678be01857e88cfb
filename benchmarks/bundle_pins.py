"""Pins for the GPU bundle: what a device run needs that the device image lacks.

Run by the python of the environment whose versions the bundle carries (CI's training-only stack
for the device, any stack for the CPU rehearsal). Writes `name==version` lines of the closure, by
declared requirements, of this package's runtime requirements, minus the closure of what the
device image already has, split by whether one wheel fits any Python 3 (the others need wheels for
the device's Python and platform).

    python benchmarks/bundle_pins.py --pure pure.txt --binary binary.txt
"""

from __future__ import annotations

import argparse
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PACKAGE = "sae-lens-allocation"
# What the device image has (issue 31); their own requirements are there too, or they could not import.
IMAGE = ("torch", "numpy", "transformers", "pandas", "pyarrow", "safetensors", "pip", "setuptools")
# Declared but never imported by a device run (plots, statistics, text corpora), and large as
# wheels (with scipy, which only these bring, over 60 MB): left out so the bundle can travel.
# The rehearsal (tests/test_gpu_run.py) fails if one of them becomes needed.
LEFT_OUT = ("matplotlib", "plotly", "plotly-express", "nltk")


def closure(roots: list[Requirement], left_out: tuple[str, ...] = ()) -> dict[str, metadata.Distribution]:
    """Installed distributions reached from `roots` through requirements whose markers hold here,
    with the extras asked for anywhere (`fsspec[http]` brings aiohttp even where plain fsspec is
    the image's); a requirement not installed here is skipped (a marker or an extra kept it out
    of this environment), and so is everything only `left_out` ones bring."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in left_out:
            continue
        try:
            dist = found.get(name) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        found[name] = dist
        for extra in {"", *req.extras} - {e for n, e in seen if n == name}:
            seen.add((name, extra))
            for line in dist.requires or []:
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append(sub)
    return found


def bundle() -> dict[str, metadata.Distribution]:
    own = metadata.distribution(PACKAGE)
    roots = [Requirement(line) for line in own.requires or []]
    roots = [r for r in roots if r.marker is None or r.marker.evaluate({"extra": ""})]
    image = closure([Requirement(name) for name in IMAGE])
    needed = closure(roots, tuple(canonicalize_name(n) for n in LEFT_OUT))
    return {name: dist for name, dist in sorted(needed.items()) if name not in image}


def fits_any_python(dist: metadata.Distribution) -> bool:
    """Tagged `py3-none-any`: one wheel fits every Python 3 and platform. Anything else needs the
    device's own (compiled parts; wandb's bundled binary; multiprocess's per-version wheels)."""
    wheel = dist.read_text("WHEEL") or ""
    return any(line.split(":", 1)[1].strip() == "py3-none-any"
               for line in wheel.splitlines() if line.startswith("Tag:"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pure", required=True, help="file for the pins whose wheel fits any Python 3")
    parser.add_argument("--binary", required=True, help="file for the pins needing a wheel for the target Python")
    args = parser.parse_args(argv)
    pins: dict[bool, list[str]] = {False: [], True: []}
    for name, dist in bundle().items():
        pins[not fits_any_python(dist)].append(f"{name}=={dist.version}\n")
    with open(args.pure, "w") as pure, open(args.binary, "w") as binary:
        pure.writelines(pins[False])
        binary.writelines(pins[True])


if __name__ == "__main__":
    main()
