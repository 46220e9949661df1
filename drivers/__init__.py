"""Serial drivers and simulators for glucose meters and the insulin pen reader."""
