"""DICOM networking (DIMSE) for ``lungcad listen``: receive studies, analyse, send results.

Modules: ``scp`` (the C-STORE/C-ECHO receiver), ``ledger`` (the SQLite record of instances,
studies and deliveries), ``sender`` (C-STORE and STOW-RS destinations) and ``listener`` (the
work loop that analyses settled studies and delivers, retrying destinations that are down).
"""
