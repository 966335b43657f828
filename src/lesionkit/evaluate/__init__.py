"""Evaluation: metrics, bootstrap intervals, calibration, subgroups, pictures and the report, for any checkpoint
on any labelled images (``evaluation``), and reports compared side by side (``compare``)."""
