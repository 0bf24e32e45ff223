"""k25jax: Kimi K2.5 / K2.6 in JAX and Flax NNX."""

from k25jax.cache import LatentCache
from k25jax.checkpoint import load_model
from k25jax.config import ConfigError, K25Config, RunConfig, TextConfig, VisionConfig, preset
from k25jax.generation import generate, stream
from k25jax.model import K25, abstract_model, build_model, count_params
from k25jax.release.config import from_release_config
from k25jax.sampling import Sampling
from k25jax.serve.engine import Engine
from k25jax.session import Session
from k25jax.sharding import make_mesh, shard_model
from k25jax.tokenizer import Tokenizer

__all__ = [
    "ConfigError",
    "Engine",
    "K25",
    "K25Config",
    "LatentCache",
    "RunConfig",
    "Sampling",
    "Session",
    "TextConfig",
    "Tokenizer",
    "VisionConfig",
    "abstract_model",
    "build_model",
    "count_params",
    "from_release_config",
    "generate",
    "load_model",
    "make_mesh",
    "preset",
    "shard_model",
    "stream",
]
__version__ = "0.1.0"
