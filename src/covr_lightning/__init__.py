"""covr-lightning: COVR (a pixel SAC agent and a vision-language model that train each other) on Lightning."""

__version__ = "0.1.0"
