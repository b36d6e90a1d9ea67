"""A run's stages, each a checkpoint boundary, over a :class:`~coft_fast.stages.context.RunContext`."""
