"""dqdeploy: ship low-bit diffusion UNets with DilateQuant."""

__version__ = "0.1.0"
