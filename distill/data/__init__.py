"""Data: corpus sources and cached token blocks (``corpus``), and masking (``masking``). No model here.
"""
