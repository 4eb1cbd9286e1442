"""Counterfactual-explanation metrics of ACE (seed 003), fed the predict record during predict.

Every metric has sum-reduced states (exact under any sharding) and reads the images as they are
stored (``image_uint8`` = the counterfactual, ``input_uint8`` = the input), so recomputing a metric
from the written files gives the same value. The protocol follows the public implementation
(guillaumejs2403/ACE):

* ``FlipRate``: the fraction of explanations the classifier assigns to their target (the seed's FR;
  the reference's ``cf``), also for the unattacked inputs and for the pre-explanations.
* ``EditSize``: l1 (mean |.| per pixel) / l2 / l_inf distances to the input in [0, 1] units, and the
  mask area, over all and over successful explanations.
* ``CounterfactualFID``: FID between *all* inputs and the *successful* counterfactuals
  (``compute_FID.sh``), and sFID (``compute_sFID.sh``): split the samples in two halves A, B and
  average FID(inputs A, counterfactuals B) and FID(inputs B, counterfactuals A), so that the two sets
  never show the same image. The reference splits with ``shuf``; here a sample's half is the parity of
  a hash of its seed (reproducible and exact under sharding; the halves differ in size by chance).
* ``MNAC`` (CelebA): the mean number of attributes whose oracle decision (logit > 0) changes between
  input and successful counterfactual (``compute_MNAC.py`` counts all oracle attributes).
* ``FVA`` (CelebA): the fraction of successful counterfactuals whose face embedding has cosine
  similarity > 0.5 with the input's (``compute_FVA.py``, VGGFace2 ResNet-50); FS is the mean similarity.
* ``COUT`` (C3LT's counterfactual transition, ``compute_COUT.py``): insert the counterfactual's pixels
  into the input in order of |difference|, in 50 steps, and take the area between the target's and
  the source's probability curves; over inputs the classifier gets right.

The oracle, the face-embedding model and the FID extractor are user-supplied modules built by Hydra
from local weights (nothing is downloaded); each maps [-1, 1] images to logits / embeddings, except
the FID extractor, which takes uint8 images (``equidiff.metrics.features``).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from equidiff.errors import ConfigError
from equidiff.explain.classifiers import frozen
from equidiff.metrics.functional import frechet_distance_from_stats, statistics_from_moments
from equidiff.utils.images import uint8_to_float

log = logging.getLogger(__name__)
_F64 = torch.float64


def _zero():
    return torch.tensor(0.0, dtype=_F64)


class _SumMetric(Metric):
    is_differentiable = False
    full_state_update = False

    def _sums(self, *names: str) -> None:
        for name in names:
            self.add_state(name, default=_zero(), dist_reduce_fx="sum")


def _flag(x) -> torch.Tensor:
    return torch.as_tensor(x).reshape(-1).bool()


# ----------------------------------------------------------------------------- flip rate and edit size
class FlipRate(_SumMetric):
    """``update(success, already_flipped, pre_explanation_pred, target, source, label)``.

    Returns ``flip_rate`` (explanations classified as their target, already-flipped inputs included),
    ``input_flip_rate`` (inputs the classifier already assigns to their target: the unattacked baseline),
    ``attacked_flip_rate`` (among attacked inputs), ``pre_explanation_flip_rate``, and ``clean_accuracy``
    of the classifier on the inputs (over labelled ones: label >= 0).
    """

    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._sums("n", "n_success", "n_already", "n_attacked_success", "n_pe_success", "n_labelled", "n_correct")

    def update(self, success, already_flipped, pre_explanation_pred, target, source, label) -> None:
        success, already = _flag(success), _flag(already_flipped)
        pe_pred, target, source, label = (torch.as_tensor(v, device=success.device).reshape(-1)
                                          for v in (pre_explanation_pred, target, source, label))
        self.n += success.numel()
        self.n_success += success.sum()
        self.n_already += already.sum()
        self.n_attacked_success += (success & ~already).sum()
        self.n_pe_success += (pe_pred == target).sum()
        self.n_labelled += (label >= 0).sum()
        self.n_correct += ((label >= 0) & (source == label)).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        n, attacked = self.n.clamp_min(1), (self.n - self.n_already).clamp_min(1)
        return {"flip_rate": self.n_success / n, "input_flip_rate": self.n_already / n,
                "attacked_flip_rate": self.n_attacked_success / attacked,
                "pre_explanation_flip_rate": self.n_pe_success / n,
                "clean_accuracy": self.n_correct / self.n_labelled.clamp_min(1), "n": self.n}


class EditSize(_SumMetric):
    """``update(l1, l2, linf, mask_area, success, already_flipped)``: mean distances to the input ([0, 1] units)
    over all and over successful explanations, and the mean mask area over attacked inputs."""

    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._sums("n", "n_success", "n_attacked", "mask_area")
        for d in ("l1", "l2", "linf"):
            self._sums(d, f"{d}_success")

    def update(self, l1, l2, linf, mask_area, success, already_flipped) -> None:
        success, attacked = _flag(success), ~_flag(already_flipped)
        self.n += success.numel()
        self.n_success += success.sum()
        self.n_attacked += attacked.sum()
        self.mask_area += torch.as_tensor(mask_area).reshape(-1).double()[attacked.to(self.n.device)].sum()
        for name, v in (("l1", l1), ("l2", l2), ("linf", linf)):
            v = torch.as_tensor(v).reshape(-1).double()
            setattr(self, name, getattr(self, name) + v.sum())
            setattr(self, f"{name}_success", getattr(self, f"{name}_success") + v[success.to(v.device)].sum())

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"mask_area": self.mask_area / self.n_attacked.clamp_min(1)}
        for d in ("l1", "l2", "linf"):
            out[d] = getattr(self, d) / self.n.clamp_min(1)
            out[f"{d}_success"] = getattr(self, f"{d}_success") / self.n_success.clamp_min(1)
        return out


# ----------------------------------------------------------------------------- FID / sFID
_MASK64 = (1 << 64) - 1


def _splitmix64(s: int) -> int:
    z = (s + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sfid_half(seeds) -> torch.Tensor:
    """True for the samples of half A of the sFID split: the parity of a hash (splitmix64) of the seed."""
    seeds = torch.as_tensor(seeds).reshape(-1).tolist()
    return torch.tensor([bool(_splitmix64(int(s)) & 1) for s in seeds], dtype=torch.bool)


class PixelFeatures(nn.Module):
    """A feature "extractor" for tiny images (e.g. 8 x 8 digits): the flattened pixels of uint8 images, in [0, 1].

    Follows the extractor protocol of ``equidiff.metrics.features`` (``extractor(images_uint8) -> {name: (B, D)}``,
    ``extractor_id``, ``feature_dims``), so FID-style metrics run on embedded data without Inception weights.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.extractor_id, self.feature_dims = f"pixels:{int(dim)}", {"pixels": int(dim)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = images.flatten(1).float() / 255
        if f.shape[1] != self.feature_dims["pixels"]:
            raise ConfigError(f"PixelFeatures(dim={self.feature_dims['pixels']}) got images of {f.shape[1]} values")
        return {"pixels": f}


class CounterfactualFID(Metric):
    """FID of the successful counterfactuals against all inputs, and sFID (module docstring).

    ``update(input_uint8, image_uint8, success, seed)``. Four streamed float64 moment sets: inputs and
    successful counterfactuals in each half of the seed-hash split; FID pools the halves.

    Args:
        extractor: ``features.inception_v3(weights)`` (pool3, ``feature="2048"``), or ``PixelFeatures``.
        feature: the extractor's feature.
        min_samples: ``compute()`` refuses FID with fewer successful counterfactuals (or inputs), and sFID
            with halves below ``min_samples // 2``; 0 allows any count >= 2 (smoke tests). The FIDs of the
            paper use the whole CelebA validation set (about 20,000 images).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    _SETS = ("real_a", "real_b", "cf_a", "cf_b")

    def __init__(self, extractor: nn.Module, feature: str = "2048", min_samples: int = 2048, **kwargs):
        super().__init__(**kwargs)
        dims = getattr(extractor, "feature_dims", {})
        if feature not in dims:
            raise ConfigError(f"{getattr(extractor, 'extractor_id', extractor)} has no feature {feature!r}; it "
                              f"provides {sorted(dims)}")
        self.extractor, self.feature, self.min_samples = extractor, feature, int(min_samples)
        d = int(dims[feature])
        for s in self._SETS:
            self.add_state(f"{s}_n", default=_zero(), dist_reduce_fx="sum")
            self.add_state(f"{s}_sum", default=torch.zeros(d, dtype=_F64), dist_reduce_fx="sum")
            self.add_state(f"{s}_outer", default=torch.zeros(d, d, dtype=_F64), dist_reduce_fx="sum")

    def _add(self, name: str, f: torch.Tensor) -> None:
        setattr(self, f"{name}_n", getattr(self, f"{name}_n") + f.shape[0])
        setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + f.sum(0))
        setattr(self, f"{name}_outer", getattr(self, f"{name}_outer") + f.T @ f)

    def update(self, input_uint8: torch.Tensor, image_uint8: torch.Tensor, success, seed) -> None:
        b = input_uint8.shape[0]
        feats = self.extractor(torch.cat([input_uint8, image_uint8]))[self.feature].double()
        real, cf = feats[:b], feats[b:]
        half_a = sfid_half(seed).to(feats.device)
        ok = _flag(success).to(feats.device)
        self._add("real_a", real[half_a])
        self._add("real_b", real[~half_a])
        self._add("cf_a", cf[half_a & ok])
        self._add("cf_b", cf[~half_a & ok])

    def _stats(self, *names: str):
        n = sum(getattr(self, f"{s}_n") for s in names)
        total = sum(getattr(self, f"{s}_sum") for s in names)
        outer = sum(getattr(self, f"{s}_outer") for s in names)
        return int(n.item()), total, outer

    def _fid(self, real: tuple[str, ...], cf: tuple[str, ...], need: int, what: str) -> torch.Tensor:
        (nr, sr, orr), (nc, sc, oc) = self._stats(*real), self._stats(*cf)
        if min(nr, nc) < max(need, 2):
            if need > 0 and min(nr, nc) < need:
                raise ConfigError(
                    f"{what} over {nc} successful counterfactuals and {nr} inputs: fewer than min_samples={need}. "
                    "Below the feature dimension the covariance is singular and FID is strongly biased upward; "
                    "explain more images, or, for a smoke test only, set min_samples=0")
            log.warning("%s needs at least 2 images on each side (got %d inputs, %d counterfactuals): NaN",
                        what, nr, nc)
            return torch.tensor(math.nan, dtype=_F64)
        mu_r, sig_r = statistics_from_moments(nr, sr, orr)
        mu_c, sig_c = statistics_from_moments(nc, sc, oc)
        return frechet_distance_from_stats(mu_c.cpu(), sig_c.cpu(), mu_r.cpu(), sig_r.cpu())

    def compute(self) -> dict[str, torch.Tensor]:
        fid = self._fid(("real_a", "real_b"), ("cf_a", "cf_b"), self.min_samples, "FID")
        half = self.min_samples // 2
        s1 = self._fid(("real_a",), ("cf_b",), half, "sFID (inputs A vs counterfactuals B)")
        s2 = self._fid(("real_b",), ("cf_a",), half, "sFID (inputs B vs counterfactuals A)")
        return {"fid": fid, "sfid": (s1 + s2) / 2, "sfid_ab": s1, "sfid_ba": s2,
                "n_counterfactuals": self.cf_a_n + self.cf_b_n, "n_inputs": self.real_a_n + self.real_b_n}


# ----------------------------------------------------------------------------- CelebA: MNAC and FVA
class MNAC(_SumMetric):
    """Mean number of attributes changed, by a user-supplied oracle, over successful counterfactuals.

    ``update(input_uint8, image_uint8, success)``. ``oracle`` maps [-1, 1] images to attribute logits (B, A)
    (``probabilities=True``: to probabilities); an attribute is present when its logit > 0 (probability
    > 0.5). ``ignore``: attribute indices left out of the count (the reference counts all of them).
    """

    higher_is_better = False

    def __init__(self, oracle: nn.Module, probabilities: bool = False, ignore: list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.oracle = frozen(oracle)
        self.probabilities, self.ignore = bool(probabilities), sorted(int(i) for i in (ignore or []))
        self._sums("n", "changes", "changes_sq")

    def _present(self, images_uint8: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.oracle(uint8_to_float(images_uint8))
        present = out > (0.5 if self.probabilities else 0.0)
        if self.ignore:
            keep = torch.ones(present.shape[1], dtype=torch.bool, device=present.device)
            keep[self.ignore] = False
            present = present[:, keep]
        return present

    def update(self, input_uint8: torch.Tensor, image_uint8: torch.Tensor, success) -> None:
        ok = _flag(success).to(input_uint8.device)
        if not ok.any():
            return
        changed = (self._present(input_uint8[ok]) != self._present(image_uint8[ok])).sum(1).double()
        self.n += changed.numel()
        self.changes += changed.sum()
        self.changes_sq += changed.square().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.n.clamp_min(1)
        mean = self.changes / n
        return {"mnac": mean, "mnac_std": (self.changes_sq / n - mean**2).clamp_min(0).sqrt(), "n": self.n}


class FVA(_SumMetric):
    """Face verification accuracy: cosine similarity of a face-embedding model's features of input and
    successful counterfactual; FVA = fraction above ``threshold`` (0.5), FS = mean similarity.

    ``update(input_uint8, image_uint8, success)``. ``embedder`` maps [-1, 1] images to embeddings (B, D),
    doing its own preprocessing (the reference: VGGFace2 ResNet-50 ``resnet50_ft`` at 224 px, BGR,
    mean-subtracted).
    """

    higher_is_better = True

    def __init__(self, embedder: nn.Module, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.embedder, self.threshold = frozen(embedder), float(threshold)
        self._sums("n", "n_verified", "similarity")

    def update(self, input_uint8: torch.Tensor, image_uint8: torch.Tensor, success) -> None:
        ok = _flag(success).to(input_uint8.device)
        if not ok.any():
            return
        with torch.no_grad():
            a = self.embedder(uint8_to_float(input_uint8[ok])).flatten(1)
            b = self.embedder(uint8_to_float(image_uint8[ok])).flatten(1)
        sim = F.cosine_similarity(a, b, dim=1).double()
        self.n += sim.numel()
        self.n_verified += (sim > self.threshold).sum()
        self.similarity += sim.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.n.clamp_min(1)
        return {"fva": self.n_verified / n, "fs": self.similarity / n, "n": self.n}


# ----------------------------------------------------------------------------- COUT
def _class_probs(classifier: nn.Module, images: torch.Tensor, source: torch.Tensor, target: torch.Tensor):
    """(p(source | x), p(target | x)); a single-logit classifier gives p and 1 - p."""
    logits = classifier(images)
    if logits.shape[-1] == 1:
        p1 = torch.sigmoid(logits[:, 0])
        p_source = torch.where(source == 1, p1, 1 - p1)
        return p_source, 1 - p_source
    probs = logits.softmax(-1)
    rows = torch.arange(len(images), device=images.device)
    return probs[rows, source], probs[rows, target]


def _trapezoid(curve: list[torch.Tensor]) -> torch.Tensor:
    return curve[0] / 2 + sum(curve[1:-1]) + curve[-1] / 2


def cout_scores(classifier: nn.Module, x: torch.Tensor, cf: torch.Tensor, source: torch.Tensor,
                target: torch.Tensor, num_steps: int = 50) -> torch.Tensor:
    """COUT per sample (Khorram & Fuxin, C3LT; the reference's ``eval_utils/cout_metrics.py``), in [-1, 1].

    Pixels are ordered by sum_c |cf - x| (largest first) and moved from ``cf`` into ``x`` in chunks of
    max(1, HW // num_steps); COUT = AUC(p(target)) - AUC(p(source)) along the way, the AUCs by the
    trapezoid rule over the fraction of pixels inserted.
    """
    b, _, h, w = x.shape
    hw = h * w
    step = max(1, hw // num_steps)
    order = torch.argsort((cf - x).abs().sum(1).flatten(1), dim=1, descending=True, stable=True)
    inserted = torch.zeros(b, hw, device=x.device, dtype=x.dtype)
    p_s, p_t = _class_probs(classifier, x, source, target)
    curve_s, curve_t = [p_s], [p_t]
    for start in range(0, hw, step):
        inserted.scatter_(1, order[:, start : start + step], 1.0)
        m = inserted.view(b, 1, h, w)
        p_s, p_t = _class_probs(classifier, cf * m + x * (1 - m), source, target)
        curve_s.append(p_s)
        curve_t.append(p_t)
    scale = step / hw
    return (_trapezoid(curve_t) - _trapezoid(curve_s)) * scale


class COUT(_SumMetric):
    """Counterfactual transition score, over inputs the classifier gets right (label unknown counts as right)
    and that were attacked. ``update(input_uint8, image_uint8, source, target, label)``."""

    higher_is_better = True

    def __init__(self, classifier: nn.Module, num_steps: int = 50, **kwargs):
        super().__init__(**kwargs)
        self.classifier, self.num_steps = frozen(classifier), int(num_steps)
        self._sums("n", "cout")

    def update(self, input_uint8, image_uint8, source, target, label) -> None:
        dev = input_uint8.device
        source, target, label = (torch.as_tensor(v, device=dev).reshape(-1).long() for v in (source, target, label))
        keep = ((label < 0) | (source == label)) & (source != target)
        if not keep.any():
            return
        with torch.no_grad():
            scores = cout_scores(self.classifier, uint8_to_float(input_uint8[keep]), uint8_to_float(image_uint8[keep]),
                                 source[keep], target[keep], self.num_steps)
        self.n += scores.numel()
        self.cout += scores.double().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        return {"cout": self.cout / self.n.clamp_min(1), "n": self.n}
