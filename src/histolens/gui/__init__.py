"""The desktop viewer: a Tk window (``app``) over a toolkit-free presenter (``presenter``).

Nothing is imported here so that ``histolens --help`` and the presenter's tests stay light.
"""
