"""``python -m blended_diffusion``: the command line (cli/)."""
import sys

from .cli import main

sys.exit(main())
