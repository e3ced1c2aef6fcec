"""Triton kernels (only @triton.jit code lives here; wrappers sit next to their users)."""
