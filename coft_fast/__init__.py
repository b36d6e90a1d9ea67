"""coft_fast: label-free fine-tuning of pre-trained CLIP models (CoFT / CoFT+), fast."""
__version__ = "0.1.0"

from coft_fast.api import demo, testbed, train, zeroshot  # noqa: E402
from coft_fast.config import Config, ConfigError, DataConfig, ModelConfig, RunConfig, TestbedConfig, ZeroShotConfig  # noqa: E402
from coft_fast.models import load_clip  # noqa: E402

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TestbedConfig",
    "ZeroShotConfig",
    "__version__",
    "demo",
    "load_clip",
    "testbed",
    "train",
    "zeroshot",
]
