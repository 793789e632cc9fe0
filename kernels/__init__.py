"""Fused Triton kernels (installed as ``optimlib.kernels``), each with a PyTorch reference twin."""
