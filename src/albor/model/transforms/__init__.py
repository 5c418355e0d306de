"""Transforms of trained weights: pure functions over tensors and state dicts, no I/O.

One module per transform (`merge`: linear, SLERP, task arithmetic, TIES, DARE; `prune`: zeroing
weights and removing blocks). The stage of the same name reads and writes the checkpoints; the
mathematics lives here, where it is property-tested on its own.
"""
