"""The ``heist`` command line: glue over translators, victim_service, attacker and evaluation."""
