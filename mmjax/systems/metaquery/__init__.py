"""MetaQuery ("Transfer between Modalities with MetaQueries"): learnable queries through a
frozen MLLM, a connector, a diffusion decoder. Spec: spec/metaquery.md; configs:
``configs/metaquery.py`` (``:demo`` runs on CPU).

Modules (each imports only those above it in this list):

* `prompt`   the prompt layout: chat template or ``<bos> caption``, left padding, suffix;
* `bridge`   the method: queries and markers, the Enc-Proj connector, the condition
             (``MetaQueryModel``: MLLM + queries + connector + Sana DiT (+ DC-AE));
* `flops`    analytic training FLOPs;
* `tasks`    image tasks (reconstruct, edit, instruct): input images, condition dropout,
             three-way CFG sampling;
* `modes`    sample grids and ShapesEval (``--mode sample | eval``);
* `release`  the authors' checkpoint layout (``model.*``, ``vae.*``): ``interop.load(DIR)``,
             ``model.init_from``, ``--mode export`` with ``model.export_layout``;
* `export`   export to PyTorch formats (``--mode export``; ``scripts/metaquery_to_torch.py``
             generates images from it);
* `system`   ``MetaQuery``, the trainer's view (registry name ``metaquery``).

This file imports nothing, so ``import mmjax.systems.metaquery.prompt`` stays light.
"""
