"""Public drop-in modules built on ``jdm_fast.ops``."""
from jdm_fast.nn.attention import SelfAttention2d
from jdm_fast.nn.norm import GroupNormSiLU

__all__ = ["GroupNormSiLU", "SelfAttention2d"]
