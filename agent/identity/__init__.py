"""Who the box is: its key and credentials on disk, the signer, provisioning, renewal, recovery, wipe."""
