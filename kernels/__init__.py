"""Triton kernels with a torch reference beside each (shipped as trainserve.kernels)."""
