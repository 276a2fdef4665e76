"""The HTML report of a run: a consumer of the files evaluation and training wrote.

Owns ``build`` (``write_report``), ``estimate`` and ``metrics`` (report sections) and
``markup`` (HTML helpers). May import: everything below it (base .. explain).
"""
