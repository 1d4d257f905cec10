"""actc kernels: the aten-level quantizer that Inductor fuses, and hand-written Triton kernels."""
