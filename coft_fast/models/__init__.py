"""CLIP models: loading through open_clip (tags, checkpoint files, local-dir folders)."""
from coft_fast.models.loading import ClipModel, WeightsUnavailableError, load_clip, needs_quick_gelu

__all__ = ["ClipModel", "WeightsUnavailableError", "load_clip", "needs_quick_gelu"]
