"""Test support code: a fault-injecting TCP proxy and helpers shared by the link and provisioning tests."""

from testbed.faultproxy import TcpProxy  # shared with `make soak`

from .buffer import fill_buffer
from .probe import MqttProbe

__all__ = ["MqttProbe", "TcpProxy", "fill_buffer"]
