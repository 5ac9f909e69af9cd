"""A declarative, configuration-driven MLOps platform on Ray."""

__version__ = "0.1.0"
