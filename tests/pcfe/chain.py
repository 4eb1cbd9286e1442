"""The embedded p-CFE benchmark chain through the real configs: fit the ERM source model, then for every solver
predict the perturbed training set, fit a fresh model on it and test it on the clean test split."""

from __future__ import annotations

import json
from pathlib import Path

from equidiff.cli import run
from tests.helpers import compose_cfg

SOLVERS = ("pgd_l2", "pgd_linf", "cfe_l2", "pcfe_l0")
NAMES = {"erm": "ERM (standard training)", "pgd_l2": "PGD-l2", "pgd_linf": "PGD-linf", "cfe_l2": "CFE-l2",
         "pcfe_l0": "p-CFE-l0 (S-CFE, KDE plausibility)"}


def _run(name: str, verb: str, root: Path, overrides) -> None:
    cfg = compose_cfg([f"experiment={name}", f"paths.log_dir={root}/outputs", f"paths.cache_dir={root}/cache",
                       "trainer=cpu", *overrides])
    run(cfg, verb)


def _fit_and_test(name: str, task: str, root: Path, overrides) -> dict:
    _run(name, "fit", root, overrides)
    _run(name, "test", root, [*overrides, f"ckpt_path={root}/outputs/{task}/checkpoints/last.ckpt"])
    return json.loads((root / "outputs" / task / "test_metrics.json").read_text())


def run_chain(root: Path, solvers=SOLVERS, *, max_items: int | None = None, train=(),
              solver_overrides=None) -> dict[str, dict]:
    """``{"erm" | solver: test metrics}``; ``max_items``: the first n items of every split, ``train``: overrides
    of every fit, ``solver_overrides``: per-solver overrides of the generation."""
    size = [] if max_items is None else [f"data.max_items={max_items}"]
    clean_size = [] if max_items is None else [f"data.clean.max_items={max_items}"]
    results = {"erm": _fit_and_test("digits/pcfe_erm", "digits_pcfe_erm", root, [*size, *train])}
    for s in solvers:
        extra = (solver_overrides or {}).get(s, [])
        _run(f"digits/pcfe_generate_{s}", "predict", root, [*size, *extra])
        results[s] = _fit_and_test(f"digits/pcfe_retrain_{s}", f"digits_pcfe_retrain_{s}", root,
                                   [*clean_size, *train])
    return results


def table(results: dict[str, dict]) -> list[str]:
    """Markdown rows: method, clean test accuracy, worst-group accuracy, per-group accuracies (%)."""
    rows = ["| trained on | test acc. (%) | WGA (%) | group acc. <5/red, <5/blue, >=5/red, >=5/blue (%) |",
            "| --- | --- | --- | --- |"]
    for k, m in results.items():
        groups = ", ".join(f"{100 * m[f'test/group_acc/{g}']:.1f}" for g in range(4))
        rows.append(f"| {NAMES.get(k, k)} | {100 * m['test/acc']:.1f} | {100 * m['test/wga']:.1f} | {groups} |")
    return rows
