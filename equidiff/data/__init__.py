"""DataModules (local folders in their real on-disk layouts, plus the embedded sets) and seeds."""

from equidiff.data.base import EquidiffDataModule, WithIndexAndSeed
from equidiff.data.celeba import CelebADataModule
from equidiff.data.cifar10 import CIFAR10DataModule
from equidiff.data.embedded import CirclesDataModule, DigitsDataModule, digits_arrays, digits_images
from equidiff.data.imagenet import ImageNetDataModule
from equidiff.data.seeds import SeedDataModule, SeedDataset
from equidiff.data.spuco import SpuCoAnimalsDataModule
from equidiff.data.waterbirds import WaterBirdsDataModule

__all__ = [
    "CIFAR10DataModule",
    "CelebADataModule",
    "CirclesDataModule",
    "DigitsDataModule",
    "EquidiffDataModule",
    "ImageNetDataModule",
    "SeedDataModule",
    "SeedDataset",
    "SpuCoAnimalsDataModule",
    "WaterBirdsDataModule",
    "WithIndexAndSeed",
    "digits_arrays",
    "digits_images",
]
