"""A run's stages, each a checkpoint boundary (a killed run resumes after the last one it finished):
``labels`` (zero-shot scoring, pseudo.refine, S*), ``prompt_tuning`` (phase I), ``filtering`` (the
generate-and-validate filter), ``finetune`` (phase II) and ``evaluation``; all read and write a
:class:`~coft_fast.stages.context.RunContext`. ``coft_fast.runners`` composes them per method."""
