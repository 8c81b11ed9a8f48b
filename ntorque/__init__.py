"""ntorque: a web-hook task queue that calls each hook at least once."""

__version__ = "1.0.0"
