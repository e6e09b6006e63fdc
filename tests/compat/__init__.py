"""Byte-for-byte comparisons of lowbit against the real bitsandbytes 0.50.2 on CPU (``-m compat``)."""
