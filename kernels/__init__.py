"""Triton kernels for MS attention (installed as ``ds_msattn.kernels``)."""
