"""Qt-free helpers of the TextDiffSeg Slicer module.

They import neither ``qt`` nor ``ctk`` nor Slicer's GUI, so they run inside Slicer and, with the
``slicer-core`` wheel's MRML classes, in plain Python tests.
"""
