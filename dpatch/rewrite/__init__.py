"""Rewriting blocks so their residual branches go through dpatch's op.

One traced block in, one generated subclass out (:mod:`._block`): code generation
(:mod:`._codegen`), source-level rewrites for forwards that branch on shapes
(:mod:`._source`), compute-skipping plans (:mod:`._skip`) and pruned-graph edits
(:mod:`._prune_graph`). What a rewrite leaves on a block is in :mod:`dpatch.marks`.

Other packages import from here only; the modules inside are this package's own.
"""

from __future__ import annotations

from dpatch.rewrite._block import RewriteCache, rewrite_block, unpatch_block
from dpatch.rewrite._skip import ancestors

__all__ = ["RewriteCache", "ancestors", "rewrite_block", "unpatch_block"]
