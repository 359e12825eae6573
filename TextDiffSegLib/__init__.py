"""TextDiffSegLib: text-prompted diffusion segmentation of CT and MR volumes."""

__version__ = "0.1.0"
