"""The test rig: the whole system on one machine (harness), a TCP fault proxy, a clock shim, a rogue CA,
the soak and the demo. Neither installed nor shipped (pyproject packages only agent, drivers, backend);
it may import anything, and nothing installed may import it."""
