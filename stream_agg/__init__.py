"""stream-agg: an incremental streaming aggregator for LLM-application traces."""

__version__ = "0.1.0"
