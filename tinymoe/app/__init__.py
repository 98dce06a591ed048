"""The applications built on the library: the command line, the tour, the training loop,
the paper reproductions (``experiments``) and the table of gradient checks.

The library (``tinymoe.tensor`` ... ``tinymoe.models``) never imports this package.
"""
