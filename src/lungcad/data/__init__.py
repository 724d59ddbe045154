"""Data: public layouts -> prepared slices, the torch Dataset, preprocessing, lung masks,
augmentation and synthetic phantoms.

Modules: ``layouts/`` (MSD, LUNA16, class folders, image/mask), ``manifest`` (records, splits,
patient groups), ``dataset`` (model input, torch Dataset, samplers), ``preprocessing``
(windowing, crop, resample, resize), ``lung_mask`` (classical lung segmentation),
``augmentation``, ``synthetic/`` (chest phantoms and cohorts).
"""
