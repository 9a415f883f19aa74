"""Compression flows: Python compositions of the layerpress kernels over whole models."""
from .norms import convert_pre_ln_to_rmsnorm, fold_norm_weights, fuse_norms  # noqa: F401
