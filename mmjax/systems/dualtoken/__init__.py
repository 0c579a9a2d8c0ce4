"""DualToken ("Towards Unifying Visual Understanding and Generation with Dual Visual
Vocabularies"): a SigLIP tower split into a shallow pixel path and a deep semantic path, each
quantised by a residual VQ with its own vocabulary, a pixel decoder, and the unified
autoregressive model with depth heads. Spec: spec/dualtoken.md.

Modules:

* `tower`        ``DualTokenTower``: SigLIP / SigLIP2 with the pixel, shortcut and semantic
                 layer taps from one pass (``features``) and the rest of the tower after the
                 semantic layer (``head``); SigLIP params split into it and joined back;
* `projections`  ``QuantProjection``: the attention projections before (width -> code dim,
                 heads averaged) and after (code dim -> width, causal) each quantiser, with the
                 release's ``prequant_*`` / ``postquant_*`` names.

This file imports nothing, so ``import mmjax.systems.dualtoken.tower`` stays light.
"""
