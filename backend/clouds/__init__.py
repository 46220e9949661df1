"""How the reference cloud sits behind each cloud profile's transport (backend/clouds/adapter.py)."""
