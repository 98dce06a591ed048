"""``python -m tinymoe ...`` runs the command-line interface."""
import sys

from tinymoe.app.cli import main

sys.exit(main())
