"""Networks of the paper's experiments."""

from models.conv6 import ConvNet6

__all__ = ["ConvNet6"]
