"""Reference cloud: provisioning CA, ingest verifier, command signer. The test rig lives in ``testbed/``."""

__all__: list[str] = []  # import the submodules: backend.service, backend.cli
