"""`python -m biomedseg.cli`."""
import sys

from . import main

sys.exit(main())
