"""Reproductions of published mechanistic-interpretability findings, paper value next to ours.

    >>> from interp import reproductions
    >>> report = reproductions.run("superposition", fast=True)   # prints the table, writes reports/
    >>> report.passed

Each finding is one module with ``reproduce(fast: bool) -> Report``:

* ``induction``: previous-token and induction heads in a 2-layer attention-only model, the 1-layer
  control, ablations, K-composition and the phase change (Elhage et al. 2021; Olsson et al. 2022).
* ``grokking``: modular addition memorised, then generalised through a handful of Fourier
  frequencies (Nanda et al. 2023).
* ``adversarial``: FGSM and PGD on the digits models, adversarial training, and where inside the
  CNN the attack bites (Goodfellow et al. 2015; Madry et al. 2018).
* ``superposition``: toy models of superposition: the pentagon, the 1 and 1/2 plateaus, the linear
  twin (Elhage et al. 2022).
* ``icl-gd``: one linear self-attention layer trained on in-context linear regression implements one
  step of gradient descent, weights and all (von Oswald et al. 2023; Mahankali et al. 2023).
* ``clock-pizza``: modular addition learned by two algorithms, Clock with standard attention and
  Pizza with constant attention, told apart by gradient symmetricity and distance irrelevance
  (Zhong et al. 2023).
* ``saes``: sparse autoencoders recover ground-truth features in superposition (MMCS, Hungarian MCC)
  and a toy model's feature directions (Sharkey, Braun & Millidge 2022).
* ``circuits``: attribution graphs with transcoders on the grammar model, checked against
  interventions in the real model: agreement features flip the verb's number, the IOI path from the
  name to the answer restores the logit difference (Ameisen et al. 2025).

The faithful variants analyse the shipped zoo checkpoints. ``fast=True`` keeps the same checks with
smaller budgets and looser, stated bounds; each module's docstring says what it retrains.
"""

from __future__ import annotations

import importlib
import inspect
import time
from pathlib import Path

from interp.errors import InputError, closest
from interp.reproductions.report import Check, Report

FINDINGS: tuple[str, ...] = (
    "induction",
    "grokking",
    "superposition",
    "adversarial",
    "icl-gd",
    "clock-pizza",
    "saes",
    "circuits",
)
_ALIASES = {
    "induction-heads": "induction",
    "induction_heads": "induction",
    "tms": "superposition",
    "icl_gd": "icl-gd",
    "clock_pizza": "clock-pizza",
    "sae": "saes",
    "sharkey": "saes",
}

# findings whose reproduce() trains independent models in worker processes (``run(..., jobs=N)``)
PARALLEL_FINDINGS: tuple[str, ...] = ("clock-pizza",)

__all__ = ["FINDINGS", "PARALLEL_FINDINGS", "Check", "Report", "from_checkpoints", "run"]


def resolve(finding: str) -> str:
    """The canonical finding name; an unknown name is an InputError listing the valid ones."""
    name = _ALIASES.get(str(finding).lower(), str(finding).lower())
    if name not in FINDINGS:
        hint = closest(name, FINDINGS)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise InputError(f"Unknown finding {finding!r}.{suggestion} Valid findings: {', '.join(FINDINGS)}.")
    return name


def _module_name(name: str) -> str:
    """The module implementing a canonical finding name (``icl-gd`` lives in ``icl_gd``)."""
    return f"interp.reproductions.{name.replace('-', '_')}"


def run(
    finding: str,
    fast: bool = False,
    out_dir: str | Path | None = None,
    *,
    quiet: bool = False,
    jobs: int | None = None,
) -> Report:
    """Reproduce ``finding``, print its table, write ``results.json`` and ``report.html``.

    Args:
        finding: one of ``FINDINGS``.
        fast: reduced budgets, same checks, looser bounds (see each module).
        out_dir: where to write the report (default ``reports/FINDING``, or ``reports/FINDING-fast``).
        quiet: do not print the table.
        jobs: worker processes for findings that retrain independent models in parallel
            (:data:`PARALLEL_FINDINGS`; default one per core); an InputError for the others.

    Returns:
        The :class:`Report`; ``report.passed`` is False if any check missed. Its
        ``timings["total"]`` (results.json's ``timings_s.total``) is the run's wall time.
    """
    name = resolve(finding)
    module = importlib.import_module(_module_name(name))
    kwargs = {}
    if jobs is not None:
        if "jobs" not in inspect.signature(module.reproduce).parameters:
            raise InputError(
                f"{name} trains its models one after another; --jobs applies to "
                f"{', '.join(PARALLEL_FINDINGS)} only (drop --jobs)."
            )
        kwargs["jobs"] = jobs
    start = time.perf_counter()
    report: Report = module.reproduce(fast=fast, **kwargs)
    report.timings["total"] = time.perf_counter() - start
    out = Path(out_dir) if out_dir is not None else Path("reports") / (f"{name}-fast" if fast else name)
    report.write(out)
    if not quiet:
        print(report.table())
        print(f"wall time: {report.timings['total']:.0f} s")
        print(f"report: {out / 'report.html'}  results: {out / 'results.json'}")
    return report


def from_checkpoints(finding: str) -> Report:
    """The faithful analysis of the shipped zoo checkpoints with nothing retrained (what the
    explorer shows). Checks that need a fresh training run are left out, so run ``run()`` to
    reproduce a finding in full."""
    name = resolve(finding)
    module = importlib.import_module(_module_name(name))
    parameters = inspect.signature(module.reproduce).parameters
    report: Report = module.reproduce(fast=False, **({"retrain": False} if "retrain" in parameters else {}))
    report.notes.append("Analysis of the shipped checkpoints only: nothing was retrained.")
    return report
