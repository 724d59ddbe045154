"""Fixtures shared by every test package (tiny configs, tiny manifests, service settings)."""
