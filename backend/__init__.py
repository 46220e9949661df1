"""Reference cloud: provisioning CA, ingest verifier, command signer."""

__all__: list[str] = []  # import the submodules: backend.service, backend.harness, backend.cli
