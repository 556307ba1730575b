import sys

from deploycomp.cli import main

sys.exit(main())
