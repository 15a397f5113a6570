"""Training losses; ``ldm.modules.losses.LPIPSWithDiscriminator`` is the path official configs name."""
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator"]
