"""Checkpoint interop: reference (transformers / diffusers) names <-> ours, as data tables.

``load`` / ``save`` are the one front door: ``load`` reads any supported transformers
(``model_type``) or diffusers (``_class_name``) directory, streaming each tensor onto its
sharding; ``save`` writes any of our family models back. ``load_hf`` / ``save_hf`` and
``diffusers_io.load_diffusers`` / ``save_diffusers`` are the per-format halves;
``subtree.load_into`` fills one parameter group of a system from a directory.

Example::

    from mmjax import interop
    module, params = interop.load("/ckpt/Qwen2.5-0.5B", mesh=mesh, rules=rules)
    interop.save(module, params, "/tmp/export")
"""
from mmjax.interop.dispatch import UnknownModelFormat, load, save
from mmjax.interop.hf import (CheckpointMismatchError, hf_state_dict, load_hf, read_config,
                              save_hf)
from mmjax.interop.tables import CONV, FLATTEN, IDENTITY, LINEAR, LINEAR_OUT, Family, Rule

__all__ = ["CONV", "CheckpointMismatchError", "FLATTEN", "Family", "IDENTITY", "LINEAR",
           "LINEAR_OUT", "Rule", "UnknownModelFormat", "hf_state_dict", "load", "load_hf",
           "read_config", "save", "save_hf"]
