"""mptcp-proxy: Multipath TCP proxies for Linux, built around the kernel's own MPTCP."""

__version__ = "0.1.0"
