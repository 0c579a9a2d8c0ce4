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
                 release's ``prequant_*`` / ``postquant_*`` names;
* `model`, `system`  the tokenizer (``DualTokenModel``) and its trainer view (two objectives);
* `checkpoint`, `eval`, `flops`  the authors' release layout, the tokenizer's modes, FLOPs;
* `unified`      ``UnifiedModel``: a Qwen2.5 LM over text and both vocabularies (visual
                 positions = ``Linear(concat(pixel, semantic))``), two depth-transformer heads
                 and the frozen tokenizer;
* `unified_system`  its trainer view (``dualtoken_unified``: mixed text-to-image /
                 image-to-text, caption dropout, per-depth cross-entropy);
* `prompt`       the fixed-length sequence layouts; `sampling` CFG image generation and
                 captioning, one XLA program each; `unified_eval` demo scores and pictures;
                 `export` the PyTorch export (``scripts/dualtoken_unified_to_torch.py``).

This file imports nothing, so ``import mmjax.systems.dualtoken.tower`` stays light.
"""
