"""Fakes of the clouds clinics run (docs/clouds.md), for the tests: never installed."""
