"""``python -m tinymoe ...`` runs the command-line interface."""
import sys

from tinymoe.cli import main

sys.exit(main())
