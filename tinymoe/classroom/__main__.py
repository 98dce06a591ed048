"""``python -m tinymoe.classroom ...`` (the same as ``tinymoe classroom ...``)."""
import sys

from .cli import main_classroom

sys.exit(main_classroom())
