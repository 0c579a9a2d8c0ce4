"""LaViDa ("A Large Diffusion Language Model for Multimodal Understanding"): LLaDA or Dream
with SigLIP anyres vision, trained by masked diffusion, sampled with cached parallel decoding.
Spec: spec/lavida.md; configs: ``configs/lavida.py`` (``:demo`` runs on CPU).

Modules (each imports only those above it in this list):

* `data`        host-side inputs: anyres views as a gather index (``VisionGeometry``), the
                chat prompt (``Prompter``), answers with supervised EOS padding and FIM;
* `model`       ``LavidaModel``: SigLIP views, projector, pooling, newlines, the splice, the LM;
* `checkpoint`  the release's checkpoint layout (``HF_FAMILY`` for ``mmjax.interop``: no
                vision_config, the tower's sizes from its tensors), ``read_release`` for
                ``model.init_from``, ``--mode export`` and ``load_export``;
* `eval`        ``--mode sample | eval``: captions, the speed / quality table, infill accuracy;
* `system`      ``Lavida``, the method (loss, sampling) and the trainer's view (registry name
                ``lavida``).

This file imports nothing, so ``import mmjax.systems.lavida.data`` stays light.
"""
