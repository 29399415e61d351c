import sys

from hopcat.cli import main

sys.exit(main())
