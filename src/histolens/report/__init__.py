"""The HTML report of a run: a consumer of the files evaluation and training wrote.

Owns ``build`` (``write_report``), ``estimate`` and ``metrics`` (report sections) and
``markup`` (HTML helpers). It reads files (the run's evaluation, its explanations); training
and the CLI call it after evaluating. May import: everything below it (base .. evaluation).
"""
