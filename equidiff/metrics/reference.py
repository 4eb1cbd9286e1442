"""Reference statistics of a real image set: streamed feature metrics, the ``.npz`` file, and the module that writes it.

FID, Inception score and precision / recall compare generated samples with real images through a feature
extractor. The real side is computed once (``equidiff predict experiment=robust_energy/cifar10_reference_stats``:
the 10,000 CIFAR-10 test images of the seed's Table 4.2 protocol) and stored in one ``.npz``:

    extractor      str      id of the FID extractor, "inception-v3-compat:<sha256 prefix of its weights>"
    mu, sigma      float64  mean (2048,) and unbiased covariance (2048, 2048) of the Inception pool3 features
    n              int64    number of real images
    prc_extractor  str      id of the precision / recall extractor, "vgg16:<sha256 prefix>" (optional)
    prc_features   float32  its fc2_relu features (n, 4096), sorted by item seed (optional)

Both sides are exact under DDP: mean and covariance come from sum-reduced float64 moments, the
precision / recall features are gathered and sorted by the items' seeds, so the file holds the same
values with 1 or N processes, up to the order of float64 additions (tested with batches of one image).
The networks themselves are not batch-invariant: a feature changes in its last bits (about 1e-5 on CPU,
as torch-fidelity's batch-size tests allow) with the other images of its batch, which sharding changes.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from equidiff.errors import ConfigError
from equidiff.metrics.functional import statistics_from_moments
from equidiff.metrics.sync import with_empty_rank_sync
from equidiff.utils.images import to_uint8
from equidiff.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

REFERENCE_COMMAND = "equidiff predict experiment=robust_energy/cifar10_reference_stats"
_REQUIRED_KEYS = ("extractor", "mu", "sigma", "n")


# --------------------------------------------------------------------------- streamed feature metrics
class FeatureStatistics(Metric):
    """Mean and covariance of an extractor's features, streamed: n, sum f and sum f f^T in float64.

    The states are sum-reduced, so the statistics are exact under any sharding. ``extractor`` maps uint8
    NCHW images to ``{feature name: (B, D)}`` and has ``extractor_id`` and ``feature_dims``
    (``equidiff.metrics.features``). ``compute()`` returns ``{"mu", "sigma", "n"}``.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, extractor: nn.Module, feature: str = "2048", **kwargs):
        super().__init__(**kwargs)
        self.extractor, self.feature = extractor, feature
        dims = getattr(extractor, "feature_dims", {})
        if feature not in dims:
            raise ConfigError(f"{getattr(extractor, 'extractor_id', extractor)} has no feature {feature!r}; it "
                              f"provides {sorted(dims)}")
        d = int(dims[feature])
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_outer", default=torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor) -> None:
        f = self.extractor(images)[self.feature].double()
        self.n += f.shape[0]
        self.total += f.sum(dim=0)
        self.total_outer += f.T @ f

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mu, sigma, n) of the features fed so far (call inside ``compute``, after the sync)."""
        n = int(self.n.item())
        if n < 2:
            raise ValueError(f"feature statistics need at least 2 images, got {n}")
        mu, sigma = statistics_from_moments(n, self.total, self.total_outer)
        return mu, sigma, n

    def compute(self) -> dict:
        mu, sigma, n = self.statistics()
        return {"mu": mu, "sigma": sigma, "n": torch.tensor(n)}


class GatheredFeatures(Metric):
    """An extractor's features with the samples' seeds, gathered across processes and sorted by seed.

    ``update(images_uint8, seeds)``; ``compute()`` returns ``{"seeds", "features"}`` in seed order, so the
    result does not depend on how the samples were sharded or batched, and a process may have fed nothing.
    Duplicate seeds are an error.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, extractor: nn.Module, feature: str, **kwargs):
        super().__init__(**with_empty_rank_sync(kwargs))
        self.extractor, self.feature = extractor, feature
        self.add_state("seeds", default=[], dist_reduce_fx="cat")
        self.add_state("features", default=[], dist_reduce_fx="cat")

    def update(self, images: torch.Tensor, seeds: torch.Tensor) -> None:
        f = self.extractor(images)[self.feature]
        seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).to(f.device)
        if seeds.numel() != f.shape[0]:
            raise ValueError(f"got {seeds.numel()} seeds for {f.shape[0]} images")
        self.seeds.append(seeds)
        self.features.append(f)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seeds, features) sorted by seed (call inside ``compute``, after the sync)."""
        if isinstance(self.seeds, list) and not self.seeds:  # a tensor after the DDP sync
            raise ValueError(f"{type(self).__name__}: no samples were fed")
        seeds, features = dim_zero_cat(self.seeds), dim_zero_cat(self.features)
        order = torch.argsort(seeds, stable=True)
        seeds, features = seeds[order], features[order]
        if seeds.numel() > 1 and (seeds[1:] == seeds[:-1]).any():
            dup = seeds[1:][seeds[1:] == seeds[:-1]].unique()[:5].tolist()
            raise ValueError(f"{type(self).__name__}: seeds {dup} were fed more than once; each sample must be "
                             "fed exactly once")
        return seeds, features

    def compute(self) -> dict:
        seeds, features = self.gathered()
        return {"seeds": seeds, "features": features}


# --------------------------------------------------------------------------- the file
@dataclass(frozen=True)
class Reference:
    """Reference statistics of a real image set (the ``.npz`` layout is in the module docstring)."""

    extractor: str
    mu: torch.Tensor
    sigma: torch.Tensor
    n: int
    prc_extractor: str | None = None
    prc_features: torch.Tensor | None = None
    path: Path | None = None


def save_reference(path: str | os.PathLike, ref: Reference) -> None:
    """Write ``ref`` to ``path`` atomically (one ``.npz``, no pickled objects)."""
    arrays = {"extractor": np.array(ref.extractor), "mu": ref.mu.double().cpu().numpy(),
              "sigma": ref.sigma.double().cpu().numpy(), "n": np.array(int(ref.n), dtype=np.int64)}
    if ref.prc_features is not None:
        arrays["prc_extractor"] = np.array(ref.prc_extractor)
        arrays["prc_features"] = ref.prc_features.float().cpu().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_reference(path: str | os.PathLike) -> Reference:
    """Read a reference ``.npz``; a missing or malformed file is a ``ConfigError`` saying how to make one."""
    path = Path(path).expanduser()
    make = (f"Create it once from the real images, with the extractor weights this run uses: `{REFERENCE_COMMAND}` "
            "(the CIFAR-10 test set; give it the same paths.cache_dir and paths.weights_dir as this run), or any "
            "predict run of method=reference_stats with method.output_path=<this file>")
    if not path.is_file():
        raise ConfigError(f"reference statistics not found: {path}. {make}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _REQUIRED_KEYS if k not in z.files]
            if missing:
                raise ConfigError(f"{path} is not a reference-statistics file: it lacks {missing} (has {z.files}). "
                                  f"{make}")
            arrays = {k: z[k] for k in z.files}
    except ConfigError:
        raise
    except Exception as e:  # not a zip, truncated, object arrays
        raise ConfigError(f"could not read {path} as a reference-statistics .npz ({e}). {make}") from e
    mu, sigma = torch.from_numpy(arrays["mu"]).double(), torch.from_numpy(arrays["sigma"]).double()
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise ConfigError(f"{path}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} are not (D,) and (D, D). "
                          f"{make}")
    prc = torch.from_numpy(arrays["prc_features"]) if "prc_features" in arrays else None
    if prc is not None and (prc.ndim != 2 or "prc_extractor" not in arrays):
        raise ConfigError(f"{path}: prc_features {tuple(prc.shape)} must be (N, D) and come with prc_extractor. "
                          f"{make}")
    return Reference(extractor=str(arrays["extractor"]), mu=mu, sigma=sigma, n=int(arrays["n"]),
                     prc_extractor=str(arrays["prc_extractor"]) if prc is not None else None,
                     prc_features=prc, path=path)


def check_extractor(ref_id: str | None, extractor: nn.Module, where, what: str) -> None:
    """Refuse a reference made with another extractor (other weights give incomparable features)."""
    own = getattr(extractor, "extractor_id", None)
    if own is None:
        raise ConfigError(f"the {what} extractor {type(extractor).__name__} has no extractor_id; build it with "
                          "equidiff.metrics.features (inception_v3, vgg16)")
    if ref_id != own:
        raise ConfigError(
            f"{where} holds {what} reference features made with extractor {ref_id!r}, but this metric's extractor "
            f"is {own!r}: features of different weights are not comparable. Recompute the reference with this "
            f"run's weights (`{REFERENCE_COMMAND}` with the same paths.weights_dir and paths.cache_dir), or give "
            "the metric the weights the reference was made with")


# --------------------------------------------------------------------------- the module that writes it
class ReferenceStatistics(L.LightningModule):
    """Predict over a DataModule's predict split and write its reference statistics to ``output_path``.

    Args:
        inception: the FID extractor (``equidiff.metrics.features.inception_v3``); its ``2048`` features
            give ``mu`` / ``sigma``.
        vgg: the precision / recall extractor (``features.vgg16``) or None; its ``fc2_relu`` features are
            stored as ``prc_features``.
        output_path: the ``.npz`` to write (rank 0, atomically, at the end of predict).
    """

    def __init__(self, inception: nn.Module, vgg: nn.Module | None, output_path: str | os.PathLike):
        super().__init__()
        self.output_path = Path(output_path)
        self.fid_stats = FeatureStatistics(inception, "2048")
        self.prc_features = GatheredFeatures(vgg, "fc2_relu") if vgg is not None else None

    def on_predict_start(self) -> None:
        for m in (self.fid_stats, self.prc_features):
            if m is not None:
                m.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        if getattr(self.trainer.datamodule, "predict_padding", False):  # a process without images of its own
            return {"seed": batch["seed"][:0]}
        # the images as the sample writer stores generated ones: uint8, rounded once (exact for uint8 data)
        images = to_uint8(batch["image"])
        self.fid_stats.update(images)
        if self.prc_features is not None:
            self.prc_features.update(images, batch["seed"])
        return {"seed": batch["seed"]}  # a record without images: nothing for a writer to store

    def on_predict_epoch_end(self) -> None:
        stats = self.fid_stats.compute()  # collective: every rank calls it
        prc = self.prc_features.compute() if self.prc_features is not None else None
        if not self.trainer.is_global_zero:
            return
        ref = Reference(extractor=self.fid_stats.extractor.extractor_id, mu=stats["mu"], sigma=stats["sigma"],
                        n=int(stats["n"]),
                        prc_extractor=self.prc_features.extractor.extractor_id if prc is not None else None,
                        prc_features=prc["features"] if prc is not None else None)
        save_reference(self.output_path, ref)
        log.info("reference statistics of %d images (%s%s) written to %s", ref.n, ref.extractor,
                 f", {ref.prc_extractor}" if prc is not None else "", self.output_path.resolve())
