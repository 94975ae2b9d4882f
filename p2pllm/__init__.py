"""p2pllm: one daemon per machine that lets a few LAN hosts act as one LLM lab."""

__version__ = "0.1.0"
