"""torch-fidelity's feature extractors, loaded safely from local weight files, with an identity.

``inception_v3(path)`` is torch-fidelity's ``FeatureExtractorInceptionV3("inception-v3-compat",
["2048", "logits_unbiased"])`` (FID and Inception score features); ``vgg16(path)`` its
``FeatureExtractorVGG16("vgg16", ["fc2_relu"])`` (precision / recall features, torch-fidelity's default).
Both take uint8 NCHW images of any size (resized inside, TF1-compatible bilinear, as torch-fidelity does);
1-channel (grey) images are repeated to 3 channels.

Nothing is downloaded. torch-fidelity itself reads a weights file with ``torch.load(weights_only=False)``,
which runs any code pickled in it; here the file is read with ``safe_torch_load`` (weights only), checked to
be a flat ``{name: tensor}`` dict, and handed to torch-fidelity as an in-memory re-serialisation of that dict.

Each extractor carries ``extractor_id = "<name>:<first 16 hex of the file's sha256>"``; reference
statistics record it, and the metrics refuse a reference made with other weights (features from
different weights are not comparable).

Loading is cached per process (same file, size and modification time -> the same module), so the FID
and the Inception score of one config share one network; and an extractor remembers its last batch, so
two metrics fed the same image tensor run the network once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16

from equidiff.classifiers.safe_load import safe_torch_load
from equidiff.errors import ConfigError

log = logging.getLogger(__name__)

INCEPTION_V3_URL = URL_INCEPTION_V3
INCEPTION_V3_FILE = URL_INCEPTION_V3.rsplit("/", 1)[1]  # weights-inception-2015-12-05-6726825d.pth
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
VGG16_FILE = VGG16_URL.rsplit("/", 1)[1]
# sizes of torch-fidelity's feature layers
FEATURE_DIMS = {"64": 64, "192": 192, "768": 768, "2048": 2048, "logits_unbiased": 1008, "logits": 1008,
                "fc2": 4096, "fc2_relu": 4096}


class FidelityExtractor(nn.Module):
    """A torch-fidelity feature extractor with an identity: uint8 images -> ``{feature name: float32 (B, D)}``.

    The protocol the metrics rely on: ``extractor(images_uint8) -> dict``, ``extractor_id`` and
    ``feature_dims`` (feature name -> D).

    Args:
        network: a torch-fidelity ``FeatureExtractorBase`` (kept in eval mode, no gradients).
        extractor_id: ``"<name>:<sha256 prefix of the weights>"``.
        batch_size: images per network call (bounds memory at 299 x 299). As in torch-fidelity, a feature
            can differ in the last bits (~1e-5 on CPU) with the composition of its batch.
    """

    def __init__(self, network: nn.Module, extractor_id: str, batch_size: int = 64):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.network, self.extractor_id, self.batch_size = network, str(extractor_id), int(batch_size)
        self.feature_names = tuple(network.features_list)
        self.feature_dims = {name: FEATURE_DIMS[name] for name in self.feature_names}
        self._last: tuple | None = None  # (input tensor, its version, outputs): one-batch memo
        self.eval()

    def train(self, mode: bool = True) -> FidelityExtractor:
        """Always eval: batch norm must use its stored statistics, whatever the parent module's mode."""
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        self._last = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise ConfigError(f"{self.extractor_id} takes uint8 images (the record's image_uint8), got "
                              f"{getattr(images, 'dtype', type(images).__name__)}")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"{self.extractor_id} takes NCHW images with 1 or 3 channels, got shape "
                              f"{tuple(images.shape)}")
        version = _version(images)
        last = self._last
        if last is not None and last[0] is images and version is not None and last[1] == version:
            return last[2]
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # grey -> RGB
        with torch.no_grad():
            parts = [self.network(chunk.contiguous()) for chunk in x.split(self.batch_size)]
        out = {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(self.feature_names)}
        self._last = (images, version, out)
        return out

    def extra_repr(self) -> str:
        return f"extractor_id={self.extractor_id!r}, features={self.feature_names}, batch_size={self.batch_size}"


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (None for inference-mode tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_weights(path: str | os.PathLike, *, what: str, url: str) -> tuple[dict, str]:
    """A local weights file -> (flat ``{name: tensor}`` state dict, sha256 hex), loaded without unpickling code.

    Raises:
        ConfigError: the file is missing (the message gives the URL), unreadable, or not a flat dict of tensors.
        UnsafeCheckpointError: the file needs pickled code to load; nothing of it was run.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{what} weights not found: {path}. equidiff never downloads at run time: on a machine with internet, "
            f"fetch {url} (e.g. `curl -L --create-dirs -o {path} {url}`) and copy it there, or point the config "
            f"at your copy (paths.weights_dir=... or the extractor's weights_path=...)")
    state = safe_torch_load(path)
    if not isinstance(state, Mapping):
        found = f"a {type(state).__name__}"
    elif not state:
        found = "an empty dict"
    else:
        bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        found = f"entries {bad[:5]} that are not tensors" if bad else None
    if found:
        raise ConfigError(f"{path} is not a flat state dict (parameter name -> tensor) as {url} is: found {found}. "
                          f"Save the network's state_dict() alone")
    return dict(state), _sha256(path)


def _build(cls, name: str, features: list[str], state: dict, path: Path, what: str) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(state, buffer)  # torch-fidelity torch.load()s this: only the tensors we just read
    buffer.seek(0)
    try:
        return cls(name, features, feature_extractor_weights_path=buffer)
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys, shape mismatches
        raise ConfigError(f"the weights in {path} do not fit torch-fidelity's {what}: {e}") from e


_CACHE: dict[tuple, FidelityExtractor] = {}


def _cached(kind: str, weights_path, batch_size: int, make) -> FidelityExtractor:
    path = Path(weights_path).expanduser()
    key = (kind, str(path.resolve()), int(batch_size))
    if path.is_file():
        st = path.stat()
        key += (st.st_size, st.st_mtime_ns)
        if key in _CACHE:
            return _CACHE[key]
    extractor = make(path)
    _CACHE[key] = extractor
    return extractor


def inception_v3(weights_path: str | os.PathLike, batch_size: int = 64) -> FidelityExtractor:
    """torch-fidelity's ``inception-v3-compat`` (features ``2048`` and ``logits_unbiased``) from a local file.

    The file is torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (``INCEPTION_V3_URL``), the
    TF1 Inception of the original FID / IS code converted to PyTorch.
    """

    def make(path: Path) -> FidelityExtractor:
        state, sha = read_weights(path, what="Inception-v3 (torch-fidelity)", url=INCEPTION_V3_URL)
        net = _build(FeatureExtractorInceptionV3, "inception-v3-compat", ["2048", "logits_unbiased"], state, path,
                     "InceptionV3")
        return FidelityExtractor(net, f"inception-v3-compat:{sha[:16]}", batch_size)

    return _cached("inception-v3-compat", weights_path, batch_size, make)


def vgg16(weights_path: str | os.PathLike, batch_size: int = 64) -> FidelityExtractor:
    """torch-fidelity's ``vgg16`` (feature ``fc2_relu``) from a local file: torchvision's
    ``VGG16_Weights.IMAGENET1K_V1`` (``VGG16_URL``), the extractor of torch-fidelity's and StyleGAN2-ADA's
    precision / recall."""

    def make(path: Path) -> FidelityExtractor:
        state, sha = read_weights(path, what="VGG16 (torchvision IMAGENET1K_V1)", url=VGG16_URL)
        net = _build(FeatureExtractorVGG16, "vgg16", ["fc2_relu"], state, path, "VGG16")
        return FidelityExtractor(net, f"vgg16:{sha[:16]}", batch_size)

    return _cached("vgg16", weights_path, batch_size, make)
