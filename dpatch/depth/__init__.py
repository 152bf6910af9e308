"""Depth on demand: measure what each residual branch is worth (:mod:`.sensitivity`),
remove branches for inference (:mod:`.prune`, :mod:`.measure`), and fold Huang's eval
scaling into the weights (:mod:`.fold`), on evaluation data (:mod:`.data`).

The functions are re-exported from :mod:`dpatch` (``dpatch.prune``, ``dpatch.sensitivity``,
``dpatch.fold``); this package keeps only modules, so ``dpatch.depth.prune`` is always the
module.
"""
