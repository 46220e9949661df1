"""Reference cloud: provisioning CA, ingest verifier, command signer."""
