"""coft_fast: label-free fine-tuning of pre-trained CLIP models (CoFT / CoFT+), fast."""
__version__ = "0.1.0"

from coft_fast.api import clean_labels, export, predict, report, train, zeroshot  # noqa: E402
from coft_fast.testbed_commands import demo, testbed  # noqa: E402
from coft_fast.config import Config, ConfigError, DataConfig, ModelConfig, RunConfig, TestbedConfig, ZeroShotConfig  # noqa: E402
from coft_fast.inference import RunModel, load_run  # noqa: E402
from coft_fast.models import load_clip  # noqa: E402

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "RunModel", "RunConfig", "TestbedConfig",
           "ZeroShotConfig", "__version__", "clean_labels", "demo", "export", "load_clip", "load_run", "predict",
           "report", "testbed", "train", "zeroshot"]
