"""The PACS link: a DICOMweb client (``dicomweb``), one study's round trip (``process``) and
the polling watcher with its ledger (``watch``).
"""
