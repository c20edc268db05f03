"""Heist's evaluator: image metrics, FID/KID, statistics, extraction and defense scoring, reports.

Everything a report shows is computed here, written to a ``results.json`` first (schema in
:mod:`evaluation.results`) and rendered from that file by :mod:`evaluation.report`.
"""
