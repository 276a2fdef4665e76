"""The desktop viewer: a Tk window over a toolkit-free presenter.

``presenter`` (the window's actions) drives ``inspector`` (the image on screen), ``batch`` (the
results list) and ``export``, with model work run by ``jobs``; ``display`` and ``model_info``
hold what the view shows. The Tk side is ``app`` (the window's wiring) over ``panels``,
``widgets`` and ``style``. Slides open in windows of their own: ``slide_presenter`` (with
``slide_display``'s values and ``slide_analysis``'s work on the slides package) drives
``slide_window`` over ``slide_canvas``. Nothing is imported here so that ``histolens --help``
and the presenters' tests stay light. May import: everything below the front ends (base ..
explain, slides); not ``histolens.web`` or ``histolens.cli``.
"""
