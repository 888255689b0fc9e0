"""pdserve: prefill/decode disaggregated LLM serving."""

from pdserve.common.version import __version__

__all__ = ["__version__"]
