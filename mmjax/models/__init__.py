"""Model families over the one transformer core; each file names its reference weights.

* ``lm``: ``DecoderLM`` (embed, core stack, final norm, head) and ``greedy_generate``.
* ``qwen2`` (causal), ``dream`` (bidirectional, shifted logits), ``llada`` (bidirectional).
* ``siglip``: the SigLIP vision tower with layer taps and the MAP head.
* ``llava_onevision`` + ``anyres``: SigLIP -> projector -> Qwen2 with anyres image views.
* ``qwen2_5_vl`` + ``qwen2_5_vl_vision``: window-attention ViT -> 2x2 patch merger -> Qwen2
  with M-RoPE; dynamic-resolution processor and chat format.

Load any of them from a transformers directory with ``mmjax.interop.load_hf(path)``.
"""
