"""Masked discrete diffusion (LLaDA, Dream, LaViDa, Fast-dLLM), one idea per module:

* ``forward``    the forward process (which answer tokens are masked, at what time) and the
                 training losses (LaViDa's token mean, LLaDA's ``1/p`` weighted);
* ``schedules``  how many tokens each sampling step commits (linear / cosine / shift, infill);
* ``drafts``     infill drafts: checking, padding, stripping [S] / [FIM] from the output;
* ``denoiser``   what the sampler needs from a model (``DiffusionLM``: logits of a sequence,
                 with or without a KV cache; or a plain ``logits_fn``);
* ``caches``     the ways to get a block's logits (none / prefix / block / dual / elastic),
                 as small strategy objects;
* ``sampler``    ``generate``: the one ``while_loop`` (propose, remask, commit).

The numpy preparation of training answers (EOS padding, [FIM] insertion) is
``mmjax.data.masked_text``. Nothing is imported here; import the module you need, e.g.
``from mmjax.diffusion.masked.sampler import generate``.
"""
