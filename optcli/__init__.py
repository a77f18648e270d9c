"""optcli: quantize, profile, serve and cost LLMs from one command line."""

__version__ = "0.2.0"
