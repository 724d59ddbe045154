"""Shared report building blocks: HTML helpers (``html``) and matplotlib figures (``figures``).

They carry no lungcad specifics, so run, evaluation, validation and study reports share them.
"""
