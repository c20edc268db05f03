"""Campaigns: a grid of victims x defenses x query budgets x attacker strategies, run from one TOML file.

:func:`~evaluation.campaign.config.load_campaign` validates the file before anything runs;
:func:`~evaluation.campaign.runner.run_campaign` starts (or targets) the victim service, attacks it
through its real HTTP API, trains surrogates, evaluates them and writes ``results.json`` and the report.
"""
