"""Triton kernels of the compressed expert forms (only @triton.jit code here; wrappers in quant.ops)."""
