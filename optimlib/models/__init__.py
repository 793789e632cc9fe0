"""LLaMA-style decoder models and their named size configs.

``build_model("llama_60m")`` gives the GaLore paper's 60M model; ``CONFIGS`` lists the sizes
(``llama_tiny`` is the CPU default) and ``num_parameters_formula`` counts a config's
parameters without building it.
"""

from optimlib.models.configs import CONFIGS, LlamaConfig, get_config, num_parameters_formula
from optimlib.models.llama import Block, Llama, RMSNorm, build_model

__all__ = ["CONFIGS", "Block", "Llama", "LlamaConfig", "RMSNorm", "build_model", "get_config",
           "num_parameters_formula"]
