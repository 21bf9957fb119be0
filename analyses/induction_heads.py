"""Induction heads (Elhage et al. 2021; Olsson et al. 2022) in the zoo's 2-layer attention-only model.

Reproduces the finding against the published numbers with the public API and prints the table
(quantity / paper / ours / tolerance / pass). Exits 1 if any check misses.

    python analyses/induction_heads.py            # faithful: the shipped zoo checkpoints
    python analyses/induction_heads.py --fast     # reduced budgets, looser stated bounds
    python analyses/induction_heads.py --out DIR  # where results.json and report.html go (default reports/induction)
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
    report = interp.reproductions.run("induction", fast=args.fast, out_dir=args.out)
    for check in report.failures:
        print(f"MISS: {check.quantity}: ours {check.ours}, wanted {check.tolerance} (paper: {check.paper})")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
