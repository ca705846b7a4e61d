"""lmforge: raw text to a trained, evaluated and served small language model."""

__version__ = "0.1.0"
