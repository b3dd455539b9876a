"""Datasets as device-resident uint8 tensors: CIFAR-100, Fashion-MNIST, CIFAR-shaped synthetic data, digits."""

from adacov.data.cifar100 import load_cifar100
from adacov.data.digits import load_digits
from adacov.data.fashion_mnist import load_fashion_mnist
from adacov.data.image_data import ImageData, crop_flip, draw_crop_flip
from adacov.data.synthetic import make_synthetic

__all__ = ["ImageData", "load_cifar100", "load_digits", "load_fashion_mnist", "make_synthetic", "crop_flip", "draw_crop_flip"]
