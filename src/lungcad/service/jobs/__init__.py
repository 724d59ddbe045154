"""The service's prediction jobs: ``schema`` (statuses, public keys, result document, API
prefix), ``store`` (job folders and state on disk), ``workers`` (queue and worker threads) and
``manager`` (starts and stops them together; deletion and retention).
"""
