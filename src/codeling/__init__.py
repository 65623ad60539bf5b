"""codeling: train small code language models from scratch, in stages, and serve them."""

__version__ = "0.1.0"
