"""Self-update of the agent (docs/updates.md): the pinned release key, and what checks a package."""
