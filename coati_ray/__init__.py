"""coati_ray: ColossalChat-style RLHF (SFT -> reward model -> PPO+PTX) as Ray actors.

Importing the package pulls in no heavy optional engine (vllm, colossalai, gptqmodel);
those load lazily inside their backends.
"""

from coati_ray.errors import CoatiError, ConfigError, DataError, MissingExtraError, ModelLoadError

__version__ = "0.1.0"

__all__ = ["CoatiError", "ConfigError", "DataError", "ModelLoadError", "MissingExtraError", "__version__"]
