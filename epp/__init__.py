"""epp: an endpoint picker for LLM inference, speaking Envoy's ext_proc like the Go EPP."""

__version__ = "0.1.0"
