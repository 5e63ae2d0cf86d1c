"""Pallas GPU kernels (Triton lowering): one module per weight-format family."""
