"""The device<->cloud contract: every message's encoder and decoder side by side, pure (no I/O).

One module per message family (docs/architecture.md lists them). This package imports only
``agent.errors`` (the error root) and itself: the box and the reference cloud both use it.
"""
