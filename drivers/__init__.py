"""Serial drivers and simulators for glucose meters and the insulin pen reader."""

__all__: list[str] = []  # import the submodules: drivers.registry, drivers.reader, drivers.<meter>
