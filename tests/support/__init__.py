"""Test support code: a fault-injecting TCP proxy and helpers shared by the link and provisioning tests."""

from .buffer import fill_buffer
from .tcp_proxy import TcpProxy

__all__ = ["TcpProxy", "fill_buffer"]
