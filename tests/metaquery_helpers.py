"""The tiny MetaQuery the MetaQuery tests share (not a test module): a very small bridge,
1-layer MLLM, 4 queries, 1-layer connector, 1-block DiT at 16 px."""
import os

from mmjax import config as mcfg
from mmjax.systems.metaquery.system import MetaQuery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "metaquery.py")
TINY = ["--config.model.num_queries=4", "--config.model.prompt_len=8",
        "--config.model.connector_layers=1", "--config.model.connector_head_dim=16",
        "--config.mllm.hf_config.num_hidden_layers=1",
        "--config.mllm.hf_config.hidden_size=32", "--config.mllm.hf_config.intermediate_size=64",
        "--config.decoder.dit.num_layers=1", "--config.decoder.dit.num_attention_heads=1",
        "--config.decoder.dit.num_cross_attention_heads=1",
        "--config.decoder.dit.caption_channels=24", "--config.decoder.dit.attention_head_dim=32",
        "--config.decoder.dit.cross_attention_head_dim=32",
        "--config.decoder.dit.cross_attention_dim=32",
        "--config.data.resolution=16", "--config.data.batch_size=8",
        "--config.sample.num_steps=3", "--config.scan_layers=False"]


def tiny(*overrides) -> MetaQuery:
  return MetaQuery(mcfg.load(CONFIG + ":demo", TINY + list(overrides)))
