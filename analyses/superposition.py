"""Toy models of superposition (Elhage et al. 2022): pentagon, 1 and 1/2 plateaus, the linear twin.

Reproduces the finding against the published numbers with the public API and prints the table
(quantity / paper / ours / tolerance / pass). Exits 1 if any check misses.

    python analyses/superposition.py            # faithful: the shipped zoo checkpoints
    python analyses/superposition.py --fast     # reduced budgets, looser stated bounds
    python analyses/superposition.py --out DIR  # where results.json and report.html go (default reports/superposition)
"""

from __future__ import annotations

import argparse
import sys

import interp.reproductions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small budgets, same checks, looser bounds")
    parser.add_argument("--out", default=None, help="report directory")
    args = parser.parse_args(argv)
    report = interp.reproductions.run("superposition", fast=args.fast, out_dir=args.out)
    for check in report.failures:
        print(f"MISS: {check.quantity}: ours {check.ours}, wanted {check.tolerance} (paper: {check.paper})")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
