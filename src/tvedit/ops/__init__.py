"""Pure per-tensor math: functions of tensors that return tensors — no files, no manifests, no printing.

* ``arith`` — extract, weighted sums, scaling (ALGORITHMS.md section 1).
* ``sparsify`` — top-k, DARE, Breadcrumbs, TALL masks, TIES and consensus merges (section 4).
* ``svd`` — singular-value merges (TSV-M, Iso-C, Iso-CTS) and low-rank factors.

The modules that orchestrate these over checkpoints live one level up: ``api`` (streaming
extract/add/scale/negate), ``merging`` (the table of merge methods), ``masking`` (``tvedit mask``),
``compress`` (low-rank storage), ``mergekit`` (recipes), ``study`` (the regime comparison).
"""
