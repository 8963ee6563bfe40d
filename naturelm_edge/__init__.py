"""naturelm-edge: the console script and its command table (see `naturelm_edge.cli`)."""

__version__ = "0.1.0"
