"""Public dataset layouts -> a prepared slice folder (manifest + .npy slices + summary).

Supported layouts (:func:`detect_layout` picks one from the folder's structure):

* ``msd``: Medical Segmentation Decathlon Task06 Lung: ``dataset.json``, ``imagesTr/*.nii.gz``,
  ``labelsTr/*.nii.gz`` (tumour masks). One group per case.
* ``luna16``: ``subset*/<seriesuid>.mhd`` (+ ``.raw``) and ``annotations.csv`` with
  ``seriesuid,coordX,coordY,coordZ,diameter_mm`` in world mm (ITK/LPS physical space, the
  same space as the ``.mhd`` origin). Nodules become spheres in the mask. One group per series.
* ``classfolders``: 2D images in one folder per class (e.g. IQ-OTH/NCCD); the user maps folder
  names to cancerous / not cancerous. No masks. Groups are contiguous blocks of file numbers
  within a folder, merged where files are exact duplicates of each other.
* ``imagemask``: 2D ``images/*.png`` with same-named ``masks/*.png``; groups are contiguous
  blocks of file numbers (no patient ids available).

3D volumes are cut into axial slices of the canonical LPS volume, windowed to [0, 1] with the
lung window. A 3D slice is labelled 1 (cancerous) when its tumour covers at least
``PrepareSettings.min_tumour_area_mm2`` (default 10 mm^2), 0 without tumour, and -1 (unknown,
mask kept) in between. The output folder is written atomically: on any error nothing is left in it.
Modules: ``common`` (settings, slice writer), ``volumes`` (3D), ``images2d`` (2D),
``prepare`` (detection, splits, summary).
"""
