"""thinnest-gateway: an API gateway in front of the thinnestAI agent chat API."""

__version__ = "0.1.0"
