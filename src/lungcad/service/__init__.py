"""The clinical service: REST API, job queue, audit log, slice rendering, web viewer, PACS link.

``lungcad.service.app.create_app(predictor, settings)`` builds the FastAPI app; ``lungcad
serve`` runs it, ``lungcad watch`` runs the PACS link. Modules:

* ``app``: the endpoints, ``ServiceSettings`` and static serving of the viewer (``static/``:
  ``index.html``, ``viewer.css`` and ES modules loaded from ``main.js``);
* ``jobs.schema``: job statuses, public keys, the result document and ``API_PREFIX``;
* ``jobs.store``: job folders and their state on disk; ``jobs.workers``: the queue and the
  worker threads that predict; ``jobs.manager``: both started and stopped together, and
  audited deletion and retention;
* ``uploads``: safe streaming, unpacking and checking of uploads;
* ``auth``: bearer tokens; ``audit``: the PHI-free audit log; ``rendering``: slice PNGs;
* ``pacs.dicomweb``: a DICOMweb client; ``pacs.process``: one study's PACS round trip;
  ``pacs.watch``: the polling watcher and its ledger.

The submodules import FastAPI, so this package imports nothing itself.
"""
