"""The release key the box pinned at provisioning (docs/updates.md): it alone signs update manifests."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.errors import CommandRejected
from agent.wire import cose

RELEASE_KEY_FILE = "release.pub"  # a public key: written 0600 like every state file, no secret


def load_release_key(state_dir: Path) -> cose.PublicKey:
    """The pinned key. Raises CommandRejected('no_release_key') on a box provisioned before releases existed."""
    from cryptography.hazmat.primitives import serialization  # only while an update runs (RSS, docs/field.md)

    path = state_dir / RELEASE_KEY_FILE
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise CommandRejected(
            "no_release_key", "this box was provisioned without a release key: re-provision it to receive updates"
        ) from None
    except (OSError, ValueError) as exc:
        raise CommandRejected("no_release_key", f"the pinned release key {path} is unreadable: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise CommandRejected("no_release_key", f"the pinned release key is a {type(key).__name__}")
    return key
