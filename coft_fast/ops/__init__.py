"""The public ops: plain-torch references, Triton kernels (``coft_fast.kernels``) and ``coft_fast._C``."""
from coft_fast.ops.dual_prompt import clean_probability, dual_prompt_loss
from coft_fast.ops.pseudo_label import PseudoLabelStats, agreement_matrix, class_balanced_topk, pseudo_label_stats
from coft_fast.ops.queue_loss import enqueue, enqueue_, queue_info_nce

__all__ = ["PseudoLabelStats", "agreement_matrix", "class_balanced_topk", "clean_probability", "dual_prompt_loss",
           "enqueue", "enqueue_", "pseudo_label_stats", "queue_info_nce"]
