"""DiT models and their sampler: the facebookresearch DiT (:mod:`.dit`), checkpoint loading (:mod:`.checkpoint`),
ADM Gaussian diffusion (:mod:`.diffusion`), class-conditional sampling (:mod:`.sample`), and the digits task
(:mod:`.digits`, :mod:`.classifier`, :mod:`.train`)."""
from .checkpoint import CheckpointError, load_dit_checkpoint, read_state_dict, save_dit_safetensors
from .diffusion import GaussianDiffusion, SampleStep, create_diffusion, space_timesteps
from .dit import DIT_CONFIGS, DiT, DiTConfig, dit_config
from .sample import sample

__all__ = ["CheckpointError", "DIT_CONFIGS", "DiT", "DiTConfig", "GaussianDiffusion", "SampleStep",
           "create_diffusion", "dit_config", "load_dit_checkpoint", "read_state_dict", "sample",
           "save_dit_safetensors", "space_timesteps"]
