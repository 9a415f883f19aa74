"""Compression flows: Python compositions of the layerpress kernels over whole models."""
from .norms import convert_pre_ln_to_rmsnorm, fold_norm_weights, fuse_norms  # noqa: F401
from .models import adapter_for, ModelAdapter  # noqa: F401
from .quantizers import rtn, gptq, QuantResult  # noqa: F401
from .importance import lim_scores, zd_scores  # noqa: F401
from .allocate import allocate_bits  # noqa: F401
from .quantize_model import quantize_model, QuantReport  # noqa: F401
from .io import save_quantized, load_quantized  # noqa: F401
from .out_of_core import quantize_checkpoint  # noqa: F401
from .evaluate import embedding_fidelity, perplexity, sentence_embeddings  # noqa: F401
