"""Pallas TPU kernels (Mosaic TPU): tested in interpret mode only — no TPU was available."""
