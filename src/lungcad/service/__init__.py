"""The clinical service: REST API, job queue, audit log, slice rendering, web viewer, PACS link.

``lungcad.service.app.create_app(predictor, settings)`` builds the FastAPI app; ``lungcad
serve`` runs it. Modules: ``app`` (endpoints, settings), ``jobs`` (persistent job queue),
``uploads`` (safe streaming and unpacking of uploads), ``auth`` (bearer tokens), ``audit``
(PHI-free audit log), ``rendering`` (slice PNGs). The submodules import FastAPI, so this
package imports nothing itself.
"""
