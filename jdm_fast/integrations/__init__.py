"""Adapters that put jdm_fast's fused ops into other libraries' models (optional dependencies)."""
