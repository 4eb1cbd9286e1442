"""FID, Inception score and VGG precision / recall of generated samples, fed ``image_uint8`` during predict.

The real side comes from a reference-statistics file (``equidiff.metrics.reference``) made once with the
same extractor weights (its ``extractor`` id must equal the metric's ``extractor.extractor_id``). The
fake side is exact under any sharding: FID streams sum-reduced float64 moments; the Inception score and
precision / recall gather features with the samples' seeds and sort by seed before computing. Each
metric equals torch-fidelity 0.4 on the same features (tested).

Protocol of the seed (Table 4.2, following guided-diffusion's evaluator): 10,000 samples against the
10,000 CIFAR-10 test images; IS with 10 splits on Inception ``logits_unbiased``; FID on Inception
pool3 (2048); precision / recall with k = 3 on VGG16 ``fc2_relu`` (torch-fidelity's default).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from equidiff.errors import ConfigError
from equidiff.metrics.functional import frechet_distance_from_stats, inception_score, precision_recall
from equidiff.metrics.reference import (
    FeatureStatistics,
    GatheredFeatures,
    Reference,
    check_extractor,
    load_reference,
)
from equidiff.metrics.sample_quality import check_knn_samples


def _reference(reference: Reference | str | os.PathLike) -> Reference:
    return reference if isinstance(reference, Reference) else load_reference(reference)


class FID(FeatureStatistics):
    """Fréchet Inception distance of the samples fed to ``update(images_uint8)`` to a reference set.

    Args:
        extractor: ``features.inception_v3(weights)``, the one the reference was made with.
        reference: the reference ``.npz`` (or a loaded ``Reference``).
        min_samples: ``compute()`` refuses fewer samples. Below the feature dimension (2048) the covariance
            is singular and FID is strongly biased upward (it is biased at any N: compare FIDs only at equal
            N; the seed uses 10,000). ``min_samples=0`` allows it, for smoke tests.
        feature: the extractor's feature (``"2048"``: pool3).
    """

    higher_is_better = False

    def __init__(self, extractor: nn.Module, reference: Reference | str | os.PathLike, min_samples: int = 2048,
                 feature: str = "2048", **kwargs):
        ref = _reference(reference)
        check_extractor(ref.extractor, extractor, ref.path or "the reference", "FID")
        super().__init__(extractor, feature, **kwargs)
        if ref.mu.shape[0] != self.total.shape[0]:
            raise ConfigError(f"{ref.path or 'the reference'} holds {ref.mu.shape[0]}-d statistics, but feature "
                              f"{feature!r} is {self.total.shape[0]}-d")
        self.min_samples = int(min_samples)
        if ref.n < self.min_samples:
            raise ConfigError(f"{ref.path or 'the reference'} holds statistics of only {ref.n} images, fewer than "
                              f"min_samples={self.min_samples}; use a larger real set, or set min_samples=0")
        self.register_buffer("ref_mu", ref.mu.double(), persistent=False)
        self.register_buffer("ref_sigma", ref.sigma.double(), persistent=False)

    def check_num_samples(self, n: int) -> None:
        """Refuse (``ConfigError``) a run of ``n`` samples that is too small for this metric."""
        if n < self.min_samples:
            raise ConfigError(
                f"FID over {n} samples: fewer than min_samples={self.min_samples}. Below 2048 samples the 2048-d "
                "covariance is singular and FID is strongly biased upward; generate more samples (the seed's "
                "protocol uses 10,000), or, for a smoke test only, allow it with min_samples=0 "
                "(e.g. metrics.fid.metric.min_samples=0)")
        if n < 2:
            raise ConfigError(f"FID needs at least 2 samples (a covariance), got {n}")

    def compute(self) -> torch.Tensor:
        self.check_num_samples(int(self.n.item()))
        mu, sigma, _ = self.statistics()
        # eigenvalues on the CPU in float64, as torch-fidelity (numpy) does
        return frechet_distance_from_stats(mu.cpu(), sigma.cpu(), self.ref_mu.cpu(), self.ref_sigma.cpu())


class InceptionScore(GatheredFeatures):
    """Inception score (``{"mean", "std"}`` over ``splits``) of the samples fed to ``update(images_uint8, seeds)``.

    Logits are gathered with the seeds and sorted by seed (the order of ``samples.npz``), then shuffled
    with torch-fidelity's fixed permutation (``rng_seed=2020``): the result equals
    ``torch_fidelity.calculate_metrics(isc=True)`` on ``samples.npz`` for the same logits, whatever the
    number of processes or the batch size.
    """

    higher_is_better = True

    def __init__(self, extractor: nn.Module, splits: int = 10, shuffle: bool = True, rng_seed: int = 2020,
                 feature: str = "logits_unbiased", **kwargs):
        super().__init__(extractor, feature, **kwargs)
        self.splits, self.shuffle, self.rng_seed = int(splits), bool(shuffle), int(rng_seed)

    def check_num_samples(self, n: int) -> None:
        """Refuse (``ConfigError``) a run of ``n`` samples that is too small for this metric."""
        if n < self.splits:
            raise ConfigError(f"the Inception score over splits={self.splits} chunks needs at least {self.splits} "
                              f"samples; this run makes {n}. Generate more, or lower splits "
                              "(metrics.<name>.metric.splits=...)")

    def compute(self) -> dict[str, torch.Tensor]:
        _, logits = self.gathered()
        mean, std = inception_score(logits.cpu(), self.splits, shuffle=self.shuffle, rng_seed=self.rng_seed)
        return {"mean": mean, "std": std}


class PrecisionRecallVGG(GatheredFeatures):
    """k-NN precision / recall (k = 3) on VGG16 ``fc2_relu`` features, against the reference's ``prc_features``.

    ``update(images_uint8, seeds)``; fake features are gathered and sorted by seed. Same definition as
    torch-fidelity >= 0.4 (input1 = generated): precision = fraction of samples inside the real k-NN
    balls, recall = fraction of real images inside the samples' k-NN balls.
    """

    higher_is_better = True

    def __init__(self, extractor: nn.Module, reference: Reference | str | os.PathLike, k: int = 3,
                 feature: str = "fc2_relu", **kwargs):
        ref = _reference(reference)
        where = ref.path or "the reference"
        if ref.prc_features is None:
            raise ConfigError(f"{where} holds no precision/recall features (it was made without a VGG extractor, "
                              "method.vgg=null); recompute it with one")
        check_extractor(ref.prc_extractor, extractor, where, "precision/recall")
        super().__init__(extractor, feature, **kwargs)
        self.k = int(k)
        self.register_buffer("real_features", ref.prc_features.float(), persistent=False)
        if len(self.real_features) <= self.k:
            raise ConfigError(f"{where} holds {len(self.real_features)} precision/recall features; k-NN radii with "
                              f"k={self.k} need more than k")

    def check_num_samples(self, n: int) -> None:
        """Refuse (``ConfigError``) a run of ``n`` samples that is too small for this metric."""
        check_knn_samples(n, self.k)

    def compute(self) -> dict[str, torch.Tensor]:
        _, fake = self.gathered()
        p, r = precision_recall(self.real_features.to(fake.device), fake, k=self.k)
        return {"precision": p, "recall": r}
