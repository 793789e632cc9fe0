"""Storage formats of optimizer state, shared by the kernels and the optimizers: block-wise 8-bit
quantization (:mod:`optimlib.formats.quantize`) and 1-bit packing (:mod:`optimlib.formats.bitpack`).
Part of the bottom layer: imports nothing else of optimlib."""
