"""Metrics of counterfactuals and sparse attacks (seed 001): functional forms per sample, and torchmetrics
classes with sum-reduced states (exact under DDP).

Per sample (functional):

* validity / attack success: f(x') = y~ (targeted) or f(x') != y (untargeted);
* ``l2_distance`` ||x' - x||_2 and ``l0_distance`` (changed coordinates: features, or pixel values);
* ``changed_pixels`` ACP: pixels whose channel-mean |x' - x| is non-zero (GSE's l0);
* ``connected_regions`` ANC: 4-connected clusters of changed pixels (``scipy.ndimage.label``, the
  reference's DFS over up/down/left/right neighbours);
* ``changed_patches`` d_{2,0}: stride-1 ``patch_size`` x ``patch_size`` windows (8 in GSE) holding a change;
* ``lof_scores``: scikit-learn's LocalOutlierFactor (novelty=True) fitted on the target class's training
  points, reported as the LOF value -score_samples (about 1 for inliers; lower is more plausible).

"Changed" means |x' - x| > ``atol`` (1e-6 by default), so float round trips (e.g. ART's [0, 1] mapping) do
not count as changes (GSE's protocol uses atol 0: every exact change counts, as its code does). Aggregates
(classes): ``CounterfactualSummary`` averages per-sample record entries (over valid samples and over all),
``AttackProtocol`` is GSE's evaluation protocol (best / average / worst case per input over its targets),
``PerturbationMetrics`` computes them from (x', x), ``LOFPlausibility`` and ``DensityScore`` (KDE / GMM
log-density under the target class).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.neighbors import LocalOutlierFactor
from threadpoolctl import threadpool_limits
from torchmetrics import Metric

from equidiff.errors import ConfigError

ATOL = 1e-6


# ----------------------------------------------------------------------------- functional
def validity(pred: torch.Tensor, target: torch.Tensor, targeted: bool = True) -> torch.Tensor:
    """1.0 where f(x') = y~ (targeted) or f(x') != y (untargeted), else 0.0."""
    return (pred == target if targeted else pred != target).double()


def l2_distance(x: torch.Tensor, x_cf: torch.Tensor) -> torch.Tensor:
    return (x_cf.double() - x.double()).flatten(1).norm(dim=1)


def l0_distance(x: torch.Tensor, x_cf: torch.Tensor, atol: float = ATOL) -> torch.Tensor:
    """Number of changed coordinates per sample."""
    return ((x_cf.double() - x.double()).abs() > atol).flatten(1).sum(1).double()


def _pixel_mask(x: torch.Tensor, x_cf: torch.Tensor, atol: float) -> torch.Tensor:
    """(B, H, W) bool: pixels whose channel-mean |x' - x| exceeds atol."""
    if x.ndim != 4:
        raise ConfigError(f"pixel metrics (ACP, ANC, d_2,0) need images (B, C, H, W), got shape {tuple(x.shape)}")
    return (x_cf.double() - x.double()).abs().mean(1) > atol


def changed_pixels(x: torch.Tensor, x_cf: torch.Tensor, atol: float = ATOL) -> torch.Tensor:
    """ACP per sample: changed pixels (channel-mean |x' - x| > atol)."""
    return _pixel_mask(x, x_cf, atol).flatten(1).sum(1).double()


def connected_regions(x: torch.Tensor, x_cf: torch.Tensor, atol: float = ATOL) -> torch.Tensor:
    """ANC per sample: 4-connected clusters of changed pixels."""
    masks = _pixel_mask(x, x_cf, atol).cpu().numpy()
    return torch.tensor([float(ndimage.label(m)[1]) for m in masks], dtype=torch.float64, device=x.device)


def changed_patches(x: torch.Tensor, x_cf: torch.Tensor, patch_size: int = 8, atol: float = ATOL) -> torch.Tensor:
    """d_{2,0} per sample: stride-1 patch_size x patch_size windows (valid positions) with a non-zero change."""
    if patch_size < 1:
        raise ConfigError(f"patch_size must be >= 1, got {patch_size}")
    changed = ((x_cf.double() - x.double()).abs() > atol).any(1, keepdim=True).double() if x.ndim == 4 else None
    if changed is None:
        raise ConfigError(f"d_2,0 needs images (B, C, H, W), got shape {tuple(x.shape)}")
    k = (min(patch_size, changed.shape[-2]), min(patch_size, changed.shape[-1]))
    return F.max_pool2d(changed, k, stride=1).flatten(1).sum(1)


def fit_lof(reference_x: torch.Tensor, reference_y: torch.Tensor, n_neighbors: int = 20
            ) -> dict[int, LocalOutlierFactor]:
    """One LocalOutlierFactor (novelty=True) per class, fitted on that class's reference points."""
    x = torch.as_tensor(reference_x).flatten(1).double().cpu().numpy()
    y = torch.as_tensor(reference_y).long().cpu().numpy()
    models = {}
    with threadpool_limits(limits=1):
        for c in np.unique(y):
            pts = x[y == c]
            models[int(c)] = LocalOutlierFactor(n_neighbors=min(n_neighbors, len(pts) - 1), novelty=True).fit(pts)
    return models


def lof_scores(models: dict[int, LocalOutlierFactor], x_cf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LOF of every x' among the training points of its target class (lower is more plausible)."""
    pts = x_cf.flatten(1).double().cpu().numpy()
    out = np.zeros(len(pts))
    tgt = target.cpu().numpy()
    with threadpool_limits(limits=1):
        for c in np.unique(tgt):
            if int(c) not in models:
                raise ConfigError(f"no LOF model for class {int(c)} (the reference data has classes {sorted(models)})")
            rows = tgt == c
            out[rows] = -models[int(c)].score_samples(pts[rows])
    return torch.from_numpy(out).to(x_cf.device)


def perturbation_stats(x: torch.Tensor, x_cf: torch.Tensor, *, patch_size: int = 8, atol: float = ATOL
                       ) -> dict[str, torch.Tensor]:
    """Per-sample l2, l0 (and for images ACP, ANC, d_{2,0}) of x' - x."""
    out = {"l2": l2_distance(x, x_cf), "l0": l0_distance(x, x_cf, atol)}
    if x.ndim == 4:
        out.update(acp=changed_pixels(x, x_cf, atol), anc=connected_regions(x, x_cf, atol),
                   d20=changed_patches(x, x_cf, patch_size, atol))
    return out


# ----------------------------------------------------------------------------- torchmetrics
class CounterfactualSummary(Metric):
    """Validity and the means of per-sample quantities, over valid samples and over all.

    ``update(valid, *values)`` with the values in the order of ``names`` (record entries such as
    ``l2``, ``l0``, ``acp``, ``anc``, ``d20``, ``time``). ``compute()`` gives ``validity`` (the attack
    success rate), ``<name>`` (mean over valid samples, NaN if none) and ``<name>_all`` (over all).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, names: Sequence[str] = ("l2", "l0", "time"), **kwargs):
        super().__init__(**kwargs)
        self.names = list(names)
        k = len(self.names)
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_valid", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_all", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_valid", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, valid: torch.Tensor, *values: torch.Tensor) -> None:
        if len(values) != len(self.names):
            raise ConfigError(f"CounterfactualSummary got {len(values)} value(s) for names {self.names}")
        v = valid.double().reshape(-1)
        vals = torch.stack([torch.as_tensor(a, device=v.device).double().reshape(-1) for a in values], 1) if values \
            else v.new_zeros(len(v), 0)
        self.n += len(v)
        self.n_valid += v.sum()
        self.sum_all += vals.sum(0)
        self.sum_valid += (vals * v[:, None]).sum(0)

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"validity": self.n_valid / self.n.clamp_min(1)}
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.n.device)
        for i, name in enumerate(self.names):
            out[name] = self.sum_valid[i] / self.n_valid if self.n_valid > 0 else nan
            out[f"{name}_all"] = self.sum_all[i] / self.n.clamp_min(1)
        return out


PROTOCOL_CASES = ("best", "average", "worst", "successful")


class AttackProtocol(Metric):
    """GSE's evaluation protocol (wagnermoritz/GSE utils.py ``test_targeted`` / ``test_untargeted``).

    ``update(attacked, valid, *values)``: per input, ``attacked`` (0 for an input the protocol leaves out: the
    classifier gets it wrong), and ``valid`` and the values (``names``, e.g. ACP, ANC, d_2,0, l2) either [B]
    (one attack per input) or [B, T] (the input attacked toward T targets). Over the attacked inputs:

    * ``best``: ASR = share of inputs with at least one successful attack; each value = mean over those
      inputs of its minimum over the successful attacks (each value minimised on its own, as the code does);
    * ``average``: ASR = share of successful attacks; each value = mean over all attacks, failed ones
      included with the values of what the attack returned (GSE returns x, so 0);
    * ``worst``: ASR = share of inputs whose every attack succeeded; each value = mean over those inputs of
      its maximum over the attacks;
    * ``successful``: ASR = share of successful attacks; values = mean over the successful attacks (for one
      attack per input, the untargeted table of ``test_untargeted``; equal to ``best`` there).

    A case without inputs gives NaN (the reference writes NaN too). ``compute()`` also gives ``inputs``
    (records seen) and ``attacked``. States are sums, so the result is exact under any sharding; it does not
    reproduce the reference's results files, whose ``zip`` truncates the best / worst ASR column to the
    number of inputs with a best / worst value (a bookkeeping slip; the definitions above are its
    ``successes_baw``).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, names: Sequence[str] = ("acp", "anc", "d20", "l2"),
                 cases: Sequence[str] = ("best", "average", "worst"), **kwargs):
        super().__init__(**kwargs)
        unknown = [c for c in cases if c not in PROTOCOL_CASES]
        if unknown or not cases:
            raise ConfigError(f"unknown protocol case(s) {unknown or cases}; choose from {list(PROTOCOL_CASES)}")
        self.names, self.cases = list(names), list(cases)
        k = len(self.names)
        for state in ("inputs", "attacked", "pairs", "ok_pairs", "any_ok", "all_ok"):
            self.add_state(state, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for state in ("sum_best", "sum_average", "sum_worst", "sum_successful"):
            self.add_state(state, default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, attacked: torch.Tensor, valid: torch.Tensor, *values: torch.Tensor) -> None:
        if len(values) != len(self.names):
            raise ConfigError(f"AttackProtocol got {len(values)} value(s) for names {self.names}")
        att = attacked.reshape(-1).bool()
        ok = valid.reshape(len(att), -1).bool() & att[:, None]  # (B, T)
        if values:
            vals = torch.stack([torch.as_tensor(v, device=ok.device).double().reshape(ok.shape) for v in values], -1)
        else:
            vals = ok.new_zeros(*ok.shape, 0, dtype=torch.float64)
        vals = vals[att]  # (n, T, k) of the attacked inputs
        ok = ok[att]
        any_ok, all_ok = ok.any(1), ok.all(1)
        self.inputs += len(att)
        self.attacked += att.sum()
        self.pairs += ok.numel()
        self.ok_pairs += ok.sum()
        self.any_ok += any_ok.sum()
        self.all_ok += all_ok.sum()
        inf = torch.tensor(float("inf"), dtype=torch.float64, device=ok.device)
        best = torch.where(ok[..., None], vals, inf).amin(1)  # each value's minimum over the successful attacks
        self.sum_best += best[any_ok].sum(0)
        self.sum_average += vals.sum((0, 1))
        self.sum_worst += vals.amax(1)[all_ok].sum(0)
        self.sum_successful += (vals * ok[..., None]).sum((0, 1))

    def compute(self) -> dict[str, torch.Tensor]:
        if self.attacked == 0:
            raise ConfigError(f"the protocol attacked none of the {int(self.inputs)} input(s): the classifier "
                              f"classifies none of them correctly. Check the classifier's weights "
                              f"(classifier.weights_path) and that the data match it (range, classes), or set "
                              f"method.only_correct=false to attack every input")
        out = {"inputs": self.inputs, "attacked": self.attacked}
        counts = {"best": (self.any_ok, self.attacked, self.any_ok), "average": (self.ok_pairs, self.pairs, self.pairs),
                  "worst": (self.all_ok, self.attacked, self.all_ok),
                  "successful": (self.ok_pairs, self.pairs, self.ok_pairs)}
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.inputs.device)
        for case in self.cases:
            hits, total, n = counts[case]
            sums = getattr(self, f"sum_{case}")
            out[f"{case}/asr"] = hits / total
            for i, name in enumerate(self.names):
                out[f"{case}/{name}"] = sums[i] / n if n > 0 else nan
        return out


class PerturbationMetrics(CounterfactualSummary):
    """``update(x_cf, x, valid=None)``: l2, l0 (and ACP, ANC, d_{2,0} for images) computed from the pair."""

    def __init__(self, images: bool = False, patch_size: int = 8, atol: float = ATOL, **kwargs):
        super().__init__(names=("l2", "l0", "acp", "anc", "d20") if images else ("l2", "l0"), **kwargs)
        self.patch_size, self.atol = int(patch_size), float(atol)

    def update(self, x_cf: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        stats = perturbation_stats(x, x_cf, patch_size=self.patch_size, atol=self.atol)
        missing = [n for n in self.names if n not in stats]
        if missing:
            raise ConfigError(f"PerturbationMetrics(images=True) needs images (B, C, H, W); got shape {tuple(x.shape)}")
        valid = torch.ones(len(x), device=x.device) if valid is None else valid
        super().update(valid, *[stats[n] for n in self.names])


class LOFPlausibility(CounterfactualSummary):
    """Mean LOF of x' under its target class (scikit-learn LocalOutlierFactor, novelty=True, fitted per class on
    ``reference`` = (points, labels), e.g. the training split). ``update(x_cf, target, valid=None)``."""

    def __init__(self, reference: tuple[torch.Tensor, torch.Tensor], n_neighbors: int = 20, **kwargs):
        super().__init__(names=("lof",), **kwargs)
        self.models = fit_lof(reference[0], reference[1], n_neighbors)

    def update(self, x_cf: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        scores = lof_scores(self.models, x_cf, target.long())
        valid = torch.ones(len(x_cf), device=x_cf.device) if valid is None else valid
        super().update(valid, scores)

    def compute(self) -> dict[str, torch.Tensor]:
        out = super().compute()
        return {"lof": out["lof"], "lof_all": out["lof_all"]}


class DensityScore(CounterfactualSummary):
    """Mean log-density log q(x', y~) under the target class (a fitted ``equidiff.attacks.density.Density``,
    e.g. KDE or GMM). ``update(x_cf, target, valid=None)``."""

    def __init__(self, density, **kwargs):
        super().__init__(names=("log_density",), **kwargs)
        self.density = density

    def update(self, x_cf: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            scores = self.density.to(x_cf.device)(x_cf.float() if x_cf.dtype == torch.uint8 else x_cf, target.long())
        valid = torch.ones(len(x_cf), device=x_cf.device) if valid is None else valid
        super().update(valid, scores)

    def compute(self) -> dict[str, torch.Tensor]:
        out = super().compute()
        return {"log_density": out["log_density"], "log_density_all": out["log_density_all"]}
