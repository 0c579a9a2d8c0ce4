"""The one transformer core of mmjax: attention (GQA, RoPE, QK-norm, masks, KV cache), MLPs,
norms, embeddings and the scanned transformer stack. Model families compose these.

Example::

    import jax, jax.numpy as jnp
    from mmjax import core
    cfg = core.TransformerConfig(num_layers=2, d_model=32, num_heads=4, mlp_dim=64)
    stack = core.TransformerStack(cfg)
    x, mask = jnp.ones((1, 5, 32)), core.make_attention_mask("causal", 5)
    params = stack.init(jax.random.key(0), x, mask=mask)
    y = stack.apply(params, x, mask=mask)
"""
from mmjax.core.attention import (Attention, HeadDense, dot_product_attention, l2_normalize,
                                  relu_linear_attention, write_cache)
from mmjax.core.config import TransformerConfig, constrain, remat_policy
from mmjax.core.embeddings import (Embed, apply_rope, rope_angles, rope_cos_sin, rope_inv_freq,
                                   rotate_half, sincos_1d, sincos_2d, timestep_embedding)
from mmjax.core.masks import make_attention_mask, positions_from_padding
from mmjax.core.mlp import Mlp, conv, dense
from mmjax.core.norms import LayerNorm, RMSNorm, make_norm
from mmjax.core.transformer import (DecoderLayer, KVCache, TransformerStack, init_cache,
                                    stack_layer_params, unstack_layer_params)

__all__ = [
    "Attention", "DecoderLayer", "HeadDense", "Embed", "KVCache", "LayerNorm", "Mlp", "RMSNorm",
    "TransformerConfig", "TransformerStack", "apply_rope", "constrain", "conv", "dense",
    "dot_product_attention", "init_cache", "l2_normalize", "make_attention_mask", "make_norm",
    "positions_from_padding", "relu_linear_attention", "remat_policy", "rope_angles",
    "rope_cos_sin", "rope_inv_freq", "rotate_half", "sincos_1d", "sincos_2d", "stack_layer_params",
    "timestep_embedding", "unstack_layer_params", "write_cache",
]
