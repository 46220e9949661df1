"""Serial drivers and simulators for glucose meters and the insulin pen reader: the ground floor.

Nothing here depends on the floors above (the agent, the cloud). What a device produces is in ``drivers.models``,
what goes wrong in ``drivers.errors``, the protocol names in ``drivers.registry``.
"""

__all__: list[str] = []  # import the submodules: drivers.registry, drivers.reader, drivers.<meter>
